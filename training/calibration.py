"""Calibrated confidence for classifiers, fitted at registration on held-out rows the model
never trained on: temperature scaling (Guo et al., 2017: one scalar T dividing the logits,
chosen to minimise the negative log-likelihood; the ranking of labels never changes) and split
conformal prediction sets (Sadinle et al., 2019: the label set {y : p(y) >= 1 - q}, where q is
the calibration rows' score quantile, holds the true label with probability at least 1 - alpha
for rows exchangeable with them). Serving turns a set that is not exactly one label into an
abstention (`serve_apps`).

Labels are not always right: where a known share of them were given at random (annotators'
mistakes, `TaskConfig.label_noise`), the sets are sized for the true labels, not the noisy ones.
A random label falls in a set of s of K labels with chance s/K, so the true labels' coverage is
(noisy coverage - rho * mean s / K) / (1 - rho) (Sesia et al., 2023, the plug-in correction);
uncorrected, an error rate near the noise rate makes sets of every label and abstains on all."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_T, MAX_T = 0.05, 20.0
# conformal scores are stored to this many decimals, so sets compare at that precision: a
# confident model's scores round to 0, and a strict comparison with q = 0 left sets empty
DECIMALS = 6
TOLERANCE = 10.0 ** -DECIMALS


def rescale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): the log-probabilities differ from the logits by
    a per-row constant, which the softmax removes."""
    if temperature == 1.0:
        return probs
    z = np.log(np.clip(probs.astype(np.float64), 1e-45, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _nll(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = rescale(probs, temperature).astype(np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-45, None)).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the NLL of the rescaled probabilities of labels `y`
    (bounded scalar search over log T)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    found = minimize_scalar(lambda log_t: _nll(probs, y, math.exp(log_t)),
                            bounds=(math.log(MIN_T), math.log(MAX_T)), method="bounded",
                            options={"xatol": 1e-4})
    return round(math.exp(found.x), 4)


def threshold(scores: list[float], error_rate: float, label_noise: float = 0.0,
              probs: list[list[float]] | None = None,
              weights: list[float] | None = None) -> float:
    """q: the smallest score (of `scores`, sorted) s.t. at least (n + 1)(1 - alpha) of the n
    calibration rows score no more (the ceil((n + 1)(1 - alpha)) / n quantile); with
    `label_noise` rho, the smallest whose corrected coverage (module docstring; set sizes from
    the rows' calibrated `probs`) reaches 1 - alpha. With `weights` (per row, in the order of
    `scores` and `probs`), weighted split conformal (Tibshirani et al., 2019): a row counts by
    its weight and the text to answer by the largest (it is like the rows weighted up).
    Infinite (every label, so always uncertain) when no score does: n rows cannot support that
    rate (n < 1/alpha - 1)."""
    q = np.asarray(scores, dtype=np.float64)
    w = np.ones(len(q)) if weights is None else np.asarray(weights, dtype=np.float64)
    below = np.concatenate([[0.0], np.cumsum(w)])[np.searchsorted(q, q, side="right")]
    covered = below / (w.sum() + (w.max() if len(w) else 1.0))
    if label_noise:
        p = np.asarray(probs, dtype=np.float64)
        order = np.argsort(p.ravel(), kind="stable")
        flat = p.ravel()[order]
        above = np.concatenate([np.cumsum(np.repeat(w, p.shape[1])[order][::-1])[::-1], [0.0]])
        sizes = above[np.searchsorted(flat, 1 - q - TOLERANCE, side="left")] / w.sum()  # mean
        covered = (covered - label_noise * sizes / p.shape[1]) / (1 - label_noise)
    enough = np.flatnonzero(covered >= 1 - error_rate)
    return float(q[enough[0]]) if len(enough) else math.inf


@dataclass(frozen=True)
class Calibration:
    """What registration stores in the model's metadata (`llmops.json`)."""

    temperature: float
    scores: list[float]  # conformal scores of the calibration rows, with that temperature
    label_noise: float = 0.0  # the share of their labels given at random
    probs: list[list[float]] | None = None  # their calibrated probabilities
    weights: list[float] | None = None  # their weights, where some rows count for more
    targets: list[int] | None = None  # their labels (indices)

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray, label_noise: float = 0.0,
            weights: np.ndarray | None = None) -> Calibration:
        """From held-out rows' uncalibrated probabilities and their label indices (a
        `label_noise` share of them random), each row counting by its weight where given
        (`threshold`); all kept in the order of the rows' conformal scores, 1 - p(label)."""
        t = fit_temperature(probs, y)
        return cls._sorted(t, rescale(probs, t), np.asarray(y), label_noise, weights)

    @classmethod
    def _sorted(cls, temperature: float, calibrated: np.ndarray, y: np.ndarray,
                label_noise: float, weights: np.ndarray | None) -> Calibration:
        scores = np.round(1 - calibrated[np.arange(len(y)), y].astype(np.float64), DECIMALS)
        order = np.argsort(scores, kind="stable")
        return cls(temperature, scores[order].tolist(), label_noise,
                   np.round(calibrated[order].astype(np.float64), DECIMALS).tolist(),
                   None if weights is None else np.round(np.asarray(weights, np.float64)[order],
                                                         8).tolist(),
                   [int(i) for i in y[order]])

    def under(self, prior_weights: np.ndarray) -> Calibration:
        """The calibration rows as the served answers see them after a label shift to priors
        `prior_weights * training` (`training/priors.py`): probabilities adjusted as serving
        adjusts them, and each row weighing by its label's ratio q(y) / p(y) (weighted
        conformal under label shift, Podkopaev and Ramdas 2021; the sets keep their coverage
        on the shifted traffic, where the training mix's threshold over-covers the labels
        that became rarer and under-covers those that became common). Unchanged where the
        rows' labels were not stored (registered before they were)."""
        from training.priors import adjust

        if self.targets is None or self.probs is None:
            return self
        y = np.asarray(self.targets)
        w = np.asarray(prior_weights, np.float64)[y] * (
            1.0 if self.weights is None else np.asarray(self.weights))
        return self._sorted(self.temperature, adjust(np.asarray(self.probs), prior_weights), y,
                            self.label_noise, w)

    @classmethod
    def of(cls, meta: dict) -> Calibration | None:
        c = meta.get("calibration")
        return cls(float(c["temperature"]), list(c["scores"]), float(c.get("label_noise", 0.0)),
                   c.get("probs"), c.get("weights"), c.get("targets")) if c else None

    @classmethod
    def served(cls, meta: dict, priors: dict[str, float] | None = None) -> Calibration | None:
        """A registered classifier's calibration as its answers are served: `under` its
        priors (`{label: q(y) / p(y)}`, `training/priors.py`) where given."""
        from training.priors import weights

        calibration = cls.of(meta)
        return calibration.under(weights(meta["labels"], priors)) if calibration and priors \
            else calibration

    def threshold(self, error_rate: float) -> float:
        return threshold(self.scores, error_rate, self.label_noise,
                         self.probs if self.label_noise else None, self.weights)

    def to_meta(self) -> dict:
        return {"calibration": {"temperature": self.temperature, "scores": self.scores,
                                **({"label_noise": self.label_noise} if self.label_noise else {}),
                                **{k: v for k, v in (("probs", self.probs),
                                                     ("weights", self.weights),
                                                     ("targets", self.targets)) if v}}}


def temperature(meta: dict) -> float:
    """A registered classifier's temperature (1: registered before calibration existed); read
    per batch, so without copying the scores."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


def prediction_set(probs: np.ndarray, q: float) -> list[int]:
    """The labels (indices) of one row's calibrated probabilities inside the conformal set."""
    return [int(i) for i in np.flatnonzero(probs >= 1 - q - TOLERANCE)]
