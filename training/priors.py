"""Label shift without retraining: when the mix of labels moves but each label's inputs look as
before, a classifier's posteriors only need new class priors. `estimate` finds them from
unlabelled traffic by EM on the calibrated posteriors (Saerens, Latinne and Decaestecker, 2002:
the fixed point of "adjust the posteriors to the priors, average them into new priors"; with
temperature-scaled posteriors it is the BCTS-EM of Alexandari et al., 2020); `adjust` applies
them (Bayes' rule: p'(y|x) is proportional to p(y|x) q(y) / p(y)). The controller decides when
(`cluster/controller.py`), serving applies them (`serve_apps/model.py`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

FLOOR = 1e-4  # a prior is never exactly 0: a label absent for a while may come back


def training_priors(labels: Sequence[str], observed: pd.Series) -> np.ndarray:
    """The label frequencies of rows drawn from the training distribution (the reference
    profile's true labels), in the order of `labels`."""
    counts = observed.value_counts().reindex(list(labels), fill_value=0).to_numpy(float)
    return _normalised(np.maximum(counts / max(counts.sum(), 1.0), FLOOR))


def ratios(priors: Mapping[str, float], train: Mapping[str, float]) -> dict[str, float]:
    """`{label: q(y) / p(y)}`: what serving multiplies the trained posteriors by."""
    return {k: round(q / train[k], 6) for k, q in priors.items()}


def estimate(posteriors: np.ndarray, train: np.ndarray, max_iter: int = 1000,
             tol: float = 1e-6) -> np.ndarray:
    """The class priors of the population `posteriors` (rows: p(y|x) under the training priors
    `train`) were drawn from."""
    priors = train.astype(np.float64)
    for _ in range(max_iter):
        new = adjust(posteriors, priors / train).mean(axis=0)
        new = _normalised(np.maximum(new, FLOOR))
        if np.abs(new - priors).max() < tol:
            return new
        priors = new
    return priors


def adjust(posteriors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Posteriors under priors `weights * train`, from posteriors under the training priors."""
    out = posteriors.astype(np.float64) * weights
    return out / out.sum(axis=1, keepdims=True)


def weights(labels: Sequence[str], by_label: Mapping[str, float]) -> np.ndarray:
    """`{label: q(y) / p(y)}` as an array in the order of `labels` (a missing label: 1)."""
    return np.array([float(by_label.get(label, 1.0)) for label in labels])


def resample(reference: pd.DataFrame, labels: Sequence[str], priors: np.ndarray) -> pd.DataFrame:
    """The reference rows drawn again, by true label, in the proportions `priors`: what the
    training distribution looks like after a pure label shift to them (the same number of
    rows). Systematic, not random: each label's rows are repeated in turn until its share is
    filled, so they weigh alike and two checks of one window against it agree (random draws
    with replacement moved the descriptors' drift across its threshold from seed to seed,
    and a label shift for a retrain). Rows without a true label (the drifted traffic a
    retrained version profiled) count under the model's answer."""
    target = np.asarray(priors, dtype=np.float64) / np.sum(priors) * len(reference)
    counts = np.floor(target).astype(int)
    counts[np.argsort(counts - target)[:len(reference) - counts.sum()]] += 1  # largest remainders
    known = reference.label.fillna(reference.prediction) if "prediction" in reference \
        else reference.label
    by_label = {label: np.flatnonzero(known.to_numpy() == label) for label in labels}
    picks = [np.resize(by_label[label], n) for label, n in zip(labels, counts)
             if n and len(by_label[label])]
    return reference.iloc[np.concatenate(picks)].reset_index(drop=True)


def _normalised(p: np.ndarray) -> np.ndarray:
    return p / p.sum()
