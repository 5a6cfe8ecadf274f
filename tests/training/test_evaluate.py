"""Holdout metrics computed by hand on small cases."""

import numpy as np
import pytest

from training.evaluate import classification_metrics, expected_calibration_error


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 1.0
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_classification_metrics_per_class_and_macro():
    labels = ["a", "b", "c"]
    probs = np.eye(3)[[0, 0, 1, 2]] * 0.98 + 0.01
    m = classification_metrics(probs, ["a", "b", "b", "c"], labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1_a"] == pytest.approx(2 / 3) and m["f1_b"] == pytest.approx(2 / 3)
    assert m["f1_c"] == pytest.approx(1.0)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
