"""Label shift without retraining (`training/priors.py`, `cluster/label_shift.py`) on generated
data whose class-conditional distributions are known: EM finds the new priors from unlabelled
posteriors alone, the adjusted posteriors answer better than the trained ones, the reference
drawn again follows the priors, and the confirmation asks for enough labels."""

import numpy as np
import pandas as pd
import pytest

from cluster.label_shift import confirm
from cluster.settings import LabelShiftPolicy
from training.priors import adjust, estimate, resample, training_priors, weights

MEANS = np.array([-2.0, 0.0, 2.0])  # three labels, unit-variance Gaussians on a line
TRAIN = np.array([0.5, 0.3, 0.2])


def _population(priors, n: int, seed: int):
    """Inputs drawn with `priors`, their labels, and the exact posteriors a model trained
    under TRAIN reports for them (Bayes' rule with the known densities)."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=priors)
    x = rng.normal(MEANS[y], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - MEANS[None, :]) ** 2)
    posterior = likelihood * TRAIN
    return posterior / posterior.sum(axis=1, keepdims=True), y


@pytest.mark.parametrize("shifted", [[0.1, 0.3, 0.6], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2]])
def test_em_recovers_the_priors_of_unlabelled_traffic(shifted):
    posterior, y = _population(shifted, 5000, seed=3)
    found = estimate(posterior, TRAIN)
    assert found.sum() == pytest.approx(1.0)
    assert np.abs(found - shifted).max() < 0.03
    naive = posterior.mean(axis=0)  # averaging the trained posteriors is biased to TRAIN
    if shifted != list(TRAIN):
        assert np.abs(found - shifted).sum() < np.abs(naive - shifted).sum()


def test_adjusted_posteriors_answer_a_shifted_population_better():
    shifted = np.array([0.05, 0.15, 0.8])
    posterior, y = _population(shifted, 5000, seed=4)
    adjusted = adjust(posterior, estimate(posterior, TRAIN) / TRAIN)
    assert np.allclose(adjusted.sum(axis=1), 1.0)
    before, after = (posterior.argmax(1) == y).mean(), (adjusted.argmax(1) == y).mean()
    assert after > before + 0.02
    nll = [-np.log(p[np.arange(len(y)), y]).mean() for p in (posterior, adjusted)]
    assert nll[1] < nll[0]


def test_weights_and_training_priors_follow_the_label_order():
    labels = ["a", "b", "c"]
    assert weights(labels, {"c": 2.0, "a": 0.5}).tolist() == [0.5, 1.0, 2.0]
    p = training_priors(labels, pd.Series(["a", "a", "b", "a"]))
    assert p.sum() == pytest.approx(1.0) and p[0] == pytest.approx(0.75, abs=1e-3)
    assert 0 < p[2] < 1e-3  # an absent label keeps a floor: it may come back


def test_the_reference_drawn_again_has_the_new_label_mix():
    reference = pd.DataFrame({"label": ["a"] * 500 + ["b"] * 300 + ["c"] * 200,
                              "x": np.arange(1000)})
    again = resample(reference, ["a", "b", "c"], np.array([0.1, 0.1, 0.8]))
    assert len(again) == len(reference)
    assert again.label.value_counts().to_dict() == {"c": 800, "a": 100, "b": 100}
    assert set(again.x[again.label == "c"]) <= set(range(800, 1000))  # rows kept whole
    # systematic: every c row four times, no a row twice, and the same draw every time
    assert set(again.x[again.label == "c"].value_counts()) == {4}
    assert again.x[again.label == "a"].is_unique
    pd.testing.assert_frame_equal(again, resample(reference, ["a", "b", "c"],
                                                  np.array([0.1, 0.1, 0.8])))
    odd = resample(reference, ["a", "b", "c"], np.array([1, 1, 1]) / 3)  # 333.3 each
    assert len(odd) == 1000 and set(odd.label.value_counts()) == {333, 334}
    # the unlabelled traffic a retrained version profiled counts under its answer
    served = reference.assign(prediction=np.where(reference.x % 2, "a", "c"),
                              label=np.where(reference.x < 500, reference.label, None))
    mixed = resample(served, ["a", "b", "c"], np.array([0.5, 0, 0.5]))
    answered_c = mixed[mixed.label.isna() & (mixed.prediction == "c")]
    assert len(answered_c) == 500 and set(answered_c.x.value_counts()) == {2}
    assert (mixed.x % 2 == 0)[mixed.x >= 500].all() and len(mixed) == 1000


def test_the_priors_are_confirmed_only_by_enough_labels_as_accurate_as_their_confidence():
    policy = LabelShiftPolicy(min_labels=40, max_accuracy_drop=0.05)
    reference = pd.DataFrame({"prediction": ["a"] * 10, "label": ["a"] * 9 + ["b"],
                              "confidence": [0.9] * 10})  # calibrated: no gap of its own
    rows = pd.DataFrame({"prediction": ["a"] * 90 + ["b"] * 10, "label": ["a"] * 100,
                         "confidence": [0.9] * 100})
    assert confirm(rows.head(39), reference, policy)[0] is None
    verdict, reason = confirm(rows, reference, policy)
    assert verdict is True and "0.900 on 100 labels" in reason
    sure = rows.assign(confidence=0.99)  # 0.90 right where 0.99 was promised: retrain
    assert confirm(sure, reference, policy)[0] is False
    hard = rows.assign(confidence=0.6)  # labels asked for uncertain answers: no false alarm
    assert confirm(hard.assign(prediction=["a"] * 58 + ["b"] * 42), reference, policy)[0]
