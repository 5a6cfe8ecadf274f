"""The teacher's second opinion on a relabelled replay (`training/teacher.py`): it decides only
rows of a moved label, only between that label and where it moved, only when sure, only
between labels it learnt from enough rows, only where it answers the labels; it is the
champion fine-tuned on the labelled rows, and `retraining_data` asks it where a concept moved."""

import numpy as np
import pandas as pd
from conftest import register_quick

from training import teacher
from training.config import RetrainConfig
from training.data import generate
from training.refs import reference
from training.retrain import retraining_data

LABELS = ["billing", "refund", "security", "account"]


def judge_of(table: dict[str, list[float]]):
    """A judge answering from a table of probabilities per text (over `LABELS`)."""
    return lambda texts: (LABELS, np.array([table[t] for t in texts]))


def test_the_teacher_decides_moved_rows_between_their_label_and_its_move_when_sure():
    texts = ["refund me", "return label", "unsure refund", "locked out", "an invoice"]
    before = ["refund", "refund", "refund", "account", "billing"]
    relabelled = ["billing", "billing", "refund", "security", "billing"]  # the encoder's
    probs = {"refund me": [0.85, 0.05, 0.05, 0.05],  # sure: billing (where refund moved)
             "return label": [0.05, 0.9, 0.0, 0.05],  # sure: still refund
             "unsure refund": [0.5, 0.45, 0.0, 0.05],  # 0.53 of the two: the encoder's stays
             "locked out": [0.0, 0.0, 0.05, 0.95],  # sure: still account
             "an invoice": [0.0, 1.0, 0.0, 0.0]}  # billing did not move: never asked
    asked = []

    def judge(batch):
        asked.append(batch)
        return judge_of(probs)(batch)

    moves = [("refund", "billing"), ("account", "security")]
    learnt = [label for label in LABELS for _ in range(teacher.MIN_ROWS)]
    labelled = pd.DataFrame({"text": ["refund me", "return label"], "label": ["billing", "refund"]})
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, learnt, labelled)
    assert out == ["billing", "refund", "refund", "account", "billing"] and changed == 2
    assert asked == [list(labelled.text), texts[:4]]  # it answers the labels, then decides
    assert teacher.refine(texts, before, relabelled, [], judge, learnt, labelled) == (relabelled, 0)
    # a label it learnt from too few rows (the queue asked elsewhere): that move is not its call
    few = [label for label in learnt if label != "account"] + ["account"] * 2
    asked.clear()
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, few, labelled)
    assert out == ["billing", "refund", "refund", "security", "billing"] and changed == 1
    assert asked[-1] == texts[:3]


def test_the_teacher_does_not_judge_the_rows_of_a_label_it_answers_otherwise():
    """A label the teacher never saw (it came after the teacher was fitted) or did not learn:
    the rows it speaks for keep the encoder's relabelling, which counted it."""
    texts = ["Only one of the two items in order #4 was in the package.",
             "Hi team, only one of the two items in order #9 was in the package.",
             "Where is my order #4? It has been 5 days.",
             "I want a refund for order #4, the lamp doesn't work."]
    before = ["shipping", "shipping", "shipping", "refund"]
    relabelled = ["refund", "refund", "shipping", "billing"]  # the encoder's, by the labels
    late = "Good morning, only one of the two items in order #7 was in the package."
    # over billing, refund, security, shipping: the teacher holds the old concept
    old = [0.0, 0.05, 0.0, 0.95]
    probs = {texts[0]: old, texts[1]: old, late: old, texts[2]: old,
             texts[3]: [0.95, 0.05, 0.0, 0.0]}

    def judge(batch):
        return ["billing", "refund", "security", "shipping"], np.array([probs[t] for t in batch])

    moves = [("shipping", "refund"), ("refund", "billing")]
    learnt = [label for label in ("billing", "refund", "shipping") for _ in range(teacher.MIN_ROWS)]
    labelled = pd.DataFrame({"text": [late, texts[3]], "label": ["refund", "billing"]})
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, learnt, labelled)
    # the late label's phrasing keeps its move; the rest is the teacher's call
    assert out == ["refund", "refund", "shipping", "billing"] and changed == 0
    answered = labelled.assign(label=["shipping", "billing"])  # one it answers as labelled
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, learnt, answered)
    assert out == ["shipping", "shipping", "shipping", "billing"] and changed == 2


def test_the_teacher_is_the_champion_fine_tuned_on_the_labels_and_the_retrain_asks_it(
        settings, registry):
    champion = register_quick(settings, registry, "support-router")
    source = reference("support-router", champion.version)
    shifted = generate("support-tickets", "concept-shift", 300, seed=4)
    judge = teacher.fit(settings.training, registry, "support-router", source, shifted)
    labels, probs = judge(list(shifted.text[:5]))
    assert set(labels) >= set(shifted.label) and probs.shape == (5, len(labels))
    assert np.allclose(probs.sum(1), 1.0)
    one_label = shifted[shifted.label == shifted.label.iloc[0]]
    assert teacher.fit(settings.training, registry, "support-router", source, one_label) is None
    asked = []

    def fit(learn: pd.DataFrame):
        asked.append(len(learn))
        return judge

    replay = generate("support-tickets", "base", 800, seed=1)
    golden = generate("support-tickets", "base", 150, seed=9)
    config = RetrainConfig(min_labelled=60, replay_rows=800, validation_rows=100)
    data = retraining_data(shifted[["text", "label"]], replay, golden, config, teacher=fit)
    learnt = 210 - sum(data.notes["label_mistakes"].values())  # the rows learnt from
    assert asked == [learnt] and "teacher_relabelled" in data.notes
    calm = retraining_data(generate("support-tickets", "base", 300, seed=4)[["text", "label"]],
                           replay, golden, config, teacher=fit)
    assert asked == [learnt] and "teacher_relabelled" not in calm.notes  # no move: not asked
