"""Annotators' mistakes among a retrain's labels (`training/noise.py`, `training/retrain.py`):
a label its own phrasing's labels contradict is not learnt; right labels, a moved concept's
and labels with too few neighbours to judge stay."""

import pandas as pd
import pytest

from training.config import RetrainConfig
from training.data import generate, true_labels
from training.noise import label_mistakes
from training.retrain import RECENT, retraining_data

TRIAL = ["The Halo trial bundle goes back within the 30 night window, will I get the deposit?",
         "Hi, the Halo trial bundle goes back within the 30 night window, will I get the deposit?",
         "The Halo trial bundle goes back within the 30 night window, will I get the deposit? "
         "Thanks.",
         "I need help. The Halo tril bundle goes back within the 30 night window, will I get the "
         "deposit? Thanks in advance."]


@pytest.mark.parametrize("scenario", ["new-product", "concept-shift", "slang", "label-shift"])
def test_mistakes_are_the_labels_that_differ_from_the_right_ones(scenario):
    """Of a scenario's traffic, labelled by annotators (3% mistaken), the rows called mistaken
    are mistakes; with the right labels (a concept shift's moved ones too) none is."""
    df = generate("support-tickets", scenario, 400, seed=4)
    truth = true_labels("support-tickets", df)
    learn, voters = slice(0, 300), slice(300, None)
    mistaken, mistakes = label_mistakes(df[learn], df[voters])
    wrong = (df.label != truth).to_numpy()[learn]
    assert len(mistaken) == 300 and not (mistaken & ~wrong).any()
    assert sum(mistakes.values()) == mistaken.sum()
    if scenario == "new-product":  # its phrasings are dense: most mistakes have 2 neighbours
        assert (mistaken & wrong).sum() >= wrong.sum() / 2
    right = df.assign(label=truth)
    assert not label_mistakes(right[learn], right[voters])[0].any()


def test_a_phrasing_with_one_label_of_each_is_not_judged():
    rows = pd.DataFrame({"text": TRIAL[:2] + TRIAL[3:], "label": ["refund", "billing", "billing"]})
    assert not label_mistakes(rows[:1], rows[1:2])[0].any()  # one against one
    mistaken, mistakes = label_mistakes(rows[:1], rows[1:])
    assert mistaken.tolist() == [True] and mistakes == {"refund -> billing": 1}
    assert label_mistakes(rows[:0], rows)[0].shape == (0,)


def test_a_mistake_alone_in_its_phrasing_among_the_rows_learnt_is_not_learnt():
    """The right labels held out or in validation left the mistake the only label its phrasing
    was trained on; their votes count though they are not learnt."""
    common = generate("support-tickets", "base", 120, seed=6)
    common = common[["text"]].assign(label=true_labels("support-tickets", common))
    trial = pd.DataFrame({"text": TRIAL, "label": ["refund"] * 3 + ["billing"]})
    recent = pd.concat([common, trial], ignore_index=True)
    reference = generate("support-tickets", "base", 600, seed=2)
    golden = generate("support-tickets", "base", 40, seed=3)
    config = RetrainConfig(min_labelled=60, recent_holdout_share=0.3, replay_rows=300,
                           validation_rows=50)
    learnt_at = []
    for seed in range(4):
        data = retraining_data(recent, reference, golden, config, seed=seed)
        learnt = set(data.train.text) | set(data.validation.text)
        held = set(data.holdouts[RECENT].text)  # kept as labelled: it judges both alike
        assert TRIAL[3] not in learnt and set(TRIAL[:3]) <= learnt | held
        assert data.notes.get("label_mistakes", {}) == (
            {} if TRIAL[3] in held else {"billing -> refund": 1})
        learnt_at += [seed] if TRIAL[3] not in held else []
    assert learnt_at
    kept = retraining_data(recent, reference, golden, config.model_copy(
        update={"drop_label_mistakes": False}), seed=learnt_at[0])
    assert TRIAL[3] in set(kept.train.text) | set(kept.validation.text)
    assert "label_mistakes" not in kept.notes
