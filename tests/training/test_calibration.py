"""Temperature scaling and conformal prediction sets (`training/calibration.py`) on generated
data whose true probabilities are known: the fitted temperature undoes a known overconfidence,
and the prediction sets hold the true label at least as often as the error rate promises."""

import math

import numpy as np
import pytest

from training.calibration import (
    Calibration,
    fit_temperature,
    prediction_set,
    rescale,
    temperature,
    threshold,
)
from training.evaluate import expected_calibration_error


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _data(n: int, seed: int, overconfidence: float = 3.0, classes: int = 4, scale: float = 1.5):
    """Rows whose labels are drawn from softmax(z) (z of `scale`: smaller is harder), and a
    model that reports softmax(k z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, size=(n, classes))
    truth = _softmax(z)
    y = np.array([rng.choice(classes, p=p) for p in truth])
    return _softmax(overconfidence * z).astype(np.float32), y


def test_the_fitted_temperature_undoes_a_known_overconfidence():
    probs, y = _data(4000, seed=1, overconfidence=3.0)
    t = fit_temperature(probs, y)
    assert t == pytest.approx(3.0, rel=0.1)
    calibrated = rescale(probs, t)
    assert (calibrated.argmax(axis=1) == probs.argmax(axis=1)).all()  # ranking unchanged
    before, after = (expected_calibration_error(p, y) for p in (probs, calibrated))
    assert after < 0.03 < before / 3
    assert rescale(probs, 1.0) is probs
    # an underconfident model is sharpened (T < 1)
    soft, y2 = _data(4000, seed=2, overconfidence=0.5)
    assert fit_temperature(soft, y2) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("error_rate", [0.05, 0.1, 0.2])
def test_conformal_sets_cover_the_true_label_at_the_promised_rate(error_rate):
    calib_probs, calib_y = _data(1000, seed=3)
    calibration = Calibration.fit(calib_probs, calib_y)
    q = threshold(calibration.scores, error_rate)
    test_probs, test_y = _data(5000, seed=4)
    calibrated = rescale(test_probs, calibration.temperature)
    sets = [prediction_set(p, q) for p in calibrated]
    coverage = np.mean([y in s for s, y in zip(sets, test_y)])
    assert coverage >= 1 - error_rate - 0.015  # the guarantee, less sampling noise
    assert coverage <= 1 - error_rate + 0.05  # and not vacuous: sets are no larger than needed
    singletons = [(s[0], y) for s, y in zip(sets, test_y) if len(s) == 1]
    assert singletons and all(s == int(p.argmax()) for (s, _), p in zip(
        singletons, [c for c, s in zip(calibrated, sets) if len(s) == 1]))
    # a singleton is right more often than the model's answers overall
    assert np.mean([s == y for s, y in singletons]) > np.mean(calibrated.argmax(1) == test_y)


def test_a_smaller_error_rate_needs_larger_sets_and_too_few_rows_abstain_always():
    probs, y = _data(1000, seed=5)
    scores = Calibration.fit(probs, y).scores
    assert scores == sorted(scores)
    assert threshold(scores, 0.01) >= threshold(scores, 0.1) >= threshold(scores, 0.3)
    assert threshold(scores[:10], 0.05) == math.inf  # 10 rows cannot support 5%
    assert prediction_set(np.array([0.7, 0.2, 0.1]), math.inf) == [0, 1, 2]


@pytest.mark.parametrize("error_rate", [0.1, 0.2])
def test_with_random_labels_the_sets_hold_the_true_label_at_the_rate_and_no_more(error_rate):
    """A tenth of the calibration labels drawn at random: sets sized for those labels swell
    (they must hold the random ones too); told the noise rate, they hold the true label at the
    promised rate and are smaller."""
    probs, y = _data(2000, seed=7)
    rng = np.random.default_rng(8)
    noisy = np.where(rng.random(len(y)) < 0.1, rng.integers(0, 4, len(y)), y)
    naive, robust = Calibration.fit(probs, noisy), Calibration.fit(probs, noisy, label_noise=0.1)
    assert Calibration.of({"kind": "classification", **robust.to_meta()}) == robust
    test_probs, test_y = _data(5000, seed=9)
    figures = {}
    for name, c in (("naive", naive), ("robust", robust)):
        q = c.threshold(error_rate)
        sets = [prediction_set(p, q) for p in rescale(test_probs, c.temperature)]
        figures[name] = (np.mean([y in s for s, y in zip(sets, test_y)]),
                         np.mean([len(s) for s in sets]))
    assert figures["robust"][0] >= 1 - error_rate - 0.02, figures  # the guarantee, true labels
    assert figures["naive"][0] > figures["robust"][0] + 0.02, figures  # more than promised
    assert figures["naive"][1] > figures["robust"][1], figures
    # no noise: the plain split-conformal quantile, whichever way it is asked for
    plain = Calibration.fit(probs, y)
    assert plain.threshold(error_rate) == threshold(plain.scores, error_rate)
    assert "label_noise" not in plain.to_meta()["calibration"]


def test_metadata_round_trip_and_uncalibrated_models():
    probs, y = _data(300, seed=6)
    calibration = Calibration.fit(probs, y)
    meta = {"kind": "classification", **calibration.to_meta()}
    assert Calibration.of(meta) == calibration and temperature(meta) == calibration.temperature
    assert Calibration.of({"kind": "classification"}) is None
    assert temperature({"kind": "classification"}) == 1.0  # registered before calibration


def test_rows_weighted_towards_the_traffic_to_serve_give_its_coverage():
    """Calibration rows mostly of an easy old distribution and a few of a harder new one (a
    retrain's replay and its labels since a drift), serving half and half: sized on all rows
    alike the sets miss the served true label more often than promised; with the new rows
    weighted to half of the mass (weighted conformal: the weights are the served traffic's
    mix) they hold it at the promised rate. Equal weights are the plain quantile."""
    def mix(n_old: int, n_new: int, seed: int):
        old = _data(n_old, seed, overconfidence=1.0, scale=4.0)
        new = _data(n_new, seed + 1, overconfidence=1.0, scale=0.6)
        return np.vstack([old[0], new[0]]), np.concatenate([old[1], new[1]])

    probs, y = mix(1000, 80, seed=10)
    weights = np.where(np.arange(len(y)) < 1000, 0.5 / 1000, 0.5 / 80)
    plain, weighted = Calibration.fit(probs, y), Calibration.fit(probs, y, weights=weights)
    assert Calibration.of({"kind": "classification", **weighted.to_meta()}) == weighted
    test_probs, test_y = mix(2500, 2500, seed=12)
    coverage = {}
    for name, c in (("plain", plain), ("weighted", weighted)):
        q = c.threshold(0.1)
        coverage[name] = np.mean([y in prediction_set(p, q) for p, y in
                                  zip(rescale(test_probs, c.temperature), test_y)])
    assert coverage["plain"] < 0.9 - 0.03 < coverage["weighted"], coverage
    assert coverage["weighted"] <= 0.9 + 0.05, coverage  # not vacuous
    equal = Calibration.fit(probs, y, weights=np.full(len(y), 2.0))
    assert equal.threshold(0.1) == plain.threshold(0.1) == threshold(plain.scores, 0.1)
    assert Calibration.fit(probs, y, 0.1, np.full(len(y), 2.0)).threshold(0.1) == \
        Calibration.fit(probs, y, 0.1).threshold(0.1)  # and so with label noise


def _shifted(n: int, priors: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of four labels drawn in the proportions `priors`, and their true posteriors under
    uniform priors (a calibrated model trained on a balanced mix): labels 0 and 1 overlap
    (hard), 2 and 3 lie apart (easy)."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [0.8, 0.0], [6.0, 6.0], [-6.0, 6.0]])
    y = rng.choice(4, size=n, p=priors)
    x = means[y] + rng.normal(size=(n, 2))
    return _softmax(-0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)), y


@pytest.mark.parametrize("shifted", [[0.45, 0.45, 0.05, 0.05], [0.05, 0.05, 0.45, 0.45]])
def test_after_a_label_shift_the_sets_of_adjusted_answers_keep_the_promised_coverage(shifted):
    """Calibrated on a balanced mix, served to traffic where the two hard labels became 90%
    (or 10%): with the training mix's threshold the adjusted answers' sets hold the true label
    less (more) often than promised; calibrated `under` the new priors (rows weighted by
    q(y) / p(y), probabilities adjusted as serving adjusts them) they hold it at the promised
    rate. Where the easy labels weigh most, q is 0 (their scores round to it): sets compare at
    the stored precision, or they would be empty."""
    from training.priors import adjust

    uniform, shifted = np.full(4, 0.25), np.array(shifted)
    ratios = shifted / uniform
    calibration = Calibration.fit(*_shifted(2000, uniform, seed=30))
    under = calibration.under(ratios)
    assert Calibration.of({"kind": "classification", **under.to_meta()}) == under
    assert under.scores == sorted(under.scores) and under.weights is not None
    probs, y = _shifted(5000, shifted, seed=32)
    served = adjust(rescale(probs, calibration.temperature), ratios)
    coverage = {}
    for name, c in (("training mix", calibration), ("under the new priors", under)):
        q = c.threshold(0.1)
        coverage[name] = np.mean([t in prediction_set(p, q) for p, t in zip(served, y)])
    assert abs(coverage["training mix"] - 0.9) > 0.03, coverage
    assert 0.9 - 0.015 <= coverage["under the new priors"] <= 0.9 + 0.05, coverage
    # unchanged priors change nothing; a calibration stored without its labels is kept as is
    assert calibration.under(np.ones(4)).threshold(0.1) == pytest.approx(
        calibration.threshold(0.1), abs=1e-6)
    legacy = Calibration(calibration.temperature, calibration.scores)
    assert legacy.under(ratios) is legacy
