"""The teacher's second opinion on a relabelled replay (`training/teacher.py`): it decides only
rows of a moved label, only between that label and where it moved, only when sure, only
between labels it learnt from enough rows; it is the
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
        asked.extend(batch)
        return judge_of(probs)(batch)

    moves = [("refund", "billing"), ("account", "security")]
    learnt = [label for label in LABELS for _ in range(teacher.MIN_ROWS)]
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, learnt)
    assert out == ["billing", "refund", "refund", "account", "billing"] and changed == 2
    assert asked == texts[:4]
    assert teacher.refine(texts, before, relabelled, [], judge, learnt) == (relabelled, 0)
    # a label it learnt from too few rows (the queue asked elsewhere): that move is not its call
    few = [label for label in learnt if label != "account"] + ["account"] * 2
    asked.clear()
    out, changed = teacher.refine(texts, before, relabelled, moves, judge, few)
    assert out == ["billing", "refund", "refund", "security", "billing"] and changed == 1
    assert asked == texts[:3]


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
    assert asked == [210] and "teacher_relabelled" in data.notes  # the rows learnt from
    calm = retraining_data(generate("support-tickets", "base", 300, seed=4)[["text", "label"]],
                           replay, golden, config, teacher=fit)
    assert asked == [210] and "teacher_relabelled" not in calm.notes  # no move: not asked
