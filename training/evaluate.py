"""Evaluation, one home for every measure of a model: holdout metrics at registration
(accuracy, macro-F1, per-class F1 and calibration for classifiers; loss and perplexity for
language models), the gate's score of a registered version (a generator's: token-level F1 of its
answers against the reference texts), its abstention figures, and the golden set, measured
at registration and again by the health check through the same function so the two sets of
figures compare.

Golden rows come from the seeded generator (the `base` scenario, a seed of its own, the task's
label mix) and are logged with the version (`data/golden.parquet`), so the set travels with it.
Torch loads only where a model in memory is evaluated: the health check and the gate call
registered versions.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from training import data as datagen
from training.calibration import rescale
from training.config import TaskConfig


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs((pred[in_bin] == y_true[in_bin]).mean() - conf[in_bin].mean())
    return float(ece)


def _indices(y_true: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    idx = {lbl: i for i, lbl in enumerate(labels)}
    return np.array([idx[v] for v in y_true], dtype=np.int64)


def classification_metrics(probs: np.ndarray, y_true: Sequence[str], labels: Sequence[str]) -> dict:
    y = _indices(y_true, labels)
    pred = probs.argmax(axis=1)
    per_class = f1_score(y, pred, labels=range(len(labels)), average=None, zero_division=0)
    present = sorted(set(y) | set(pred))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y),
        **{f"f1_{lbl}": float(per_class[i]) for i, lbl in enumerate(labels)},
    }


def abstention_metrics(task_model, df, error_rates: Sequence[float | None],
                       priors: dict[str, float] | None = None,
                       noisy: Sequence[str] | None = None) -> list[dict]:
    """How a registered classifier (`TaskModel`, adjusted to `priors`) that abstains at each of
    `error_rates` (conformal sets, `training/calibration.py`; None, or an uncalibrated model:
    never) does on labelled rows, predicted once: its macro-F1 (as `score`), calibration
    error, the share it answers (coverage) and the accuracy of those answers (precision), also
    against `noisy` labels of the same rows if given (what annotators said, beside the truth
    in `label`)."""
    from training.calibration import Calibration, prediction_set

    labels = task_model.meta["labels"]
    out = task_model.predict(None, df[["text"]], {"priors": priors})
    probs = out[[f"prob_{lbl}" for lbl in labels]].to_numpy()
    y = _indices(df.label, labels)
    ece = round(expected_calibration_error(probs, y), 4)
    predicted = probs.argmax(axis=1)
    f1 = round(macro_f1(df.label, np.asarray(labels)[predicted]), 4)
    calibration = Calibration.served(task_model.meta, priors)
    right = predicted[:, None] == np.stack(
        [y] + ([] if noisy is None else [_indices(noisy, labels)]), axis=1)

    def at(error_rate: float | None) -> dict:
        q = calibration.threshold(error_rate) if calibration and error_rate else None
        answered = np.array([q is None or len(prediction_set(p, q)) == 1 for p in probs])
        precision = [round(float(r[answered].mean()), 4) if answered.any() else None
                     for r in right.T]
        return {"macro_f1": f1, "ece": ece, "coverage": round(float(answered.mean()), 4),
                "precision": precision[0],
                **({} if noisy is None else {"precision_against_noisy_labels": precision[1]})}

    return [at(rate) for rate in error_rates]


def evaluate_classifier(model, tokenizer, holdouts: dict, labels: Sequence[str],
                        max_length: int, temperature: float = 1.0) -> dict[str, dict]:
    """Metrics per named holdout (each a DataFrame with `text` and `label`) with the calibrated
    probabilities, and the calibration error the uncalibrated ones had (`ece_uncalibrated`)."""
    from training.models import predict_proba

    out = {}
    for name, df in holdouts.items():
        raw = predict_proba(model, tokenizer, list(df.text), max_length)
        out[name] = classification_metrics(rescale(raw, temperature), list(df.label), labels)
        out[name]["ece_uncalibrated"] = expected_calibration_error(raw, _indices(df.label, labels))
    return out


def evaluate_lm(model, tokenizer, holdouts: dict, max_length: int) -> dict[str, dict]:
    """Target-token loss and perplexity per named holdout (`text` -> `rewrite`)."""
    from training.models import lm_losses, perplexity

    out = {}
    for name, df in holdouts.items():
        nll, tokens = lm_losses(model, tokenizer, list(df.text), list(df.rewrite), max_length)
        out[name] = {"loss": nll / max(tokens, 1), "perplexity": perplexity(nll, tokens)}
    return out


# What a generator is judged by (the gate, the golden set): its greedy answers' words against the
# reference's. Exact match gives a near miss nothing (a corrected answer is rarely word for word
# what any version writes); perplexity scores the reference's likelihood, not the answer served.
GENERATION_METRIC = "token_f1"


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-level F1: the harmonic mean of the shares of the answer's and the
    reference's words (lower-cased, punctuation aside) that they share; 1 when both are empty."""
    said, meant = (re.findall(r"\w+", t.lower()) for t in (prediction, reference))
    if not said or not meant:
        return float(said == meant)
    return 2 * sum((Counter(said) & Counter(meant)).values()) / (len(said) + len(meant))


def token_f1s(answers: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """`token_f1` of each answer against its reference."""
    return np.array([token_f1(a, r) for a, r in zip(answers, references)], dtype=float)


def score(task_model, holdout: pd.DataFrame, metric: str,
          priors: dict[str, float] | None = None) -> float:
    """`metric` of a registered classifier (`TaskModel`, adjusted to `priors` if given) on a
    labelled holdout; macro-F1 over the holdout's own labels (`macro_f1`). A generator's is
    the mean `token_f1` of its answers against `rewrite`."""
    if metric == GENERATION_METRIC:
        answers = task_model.predict(None, holdout[["text"]])["text"]
        return float(token_f1s(answers, holdout["rewrite"]).mean())
    predicted = task_model.predict(None, holdout[["text"]], {"priors": priors})["label"]
    if metric == "accuracy":
        return float(accuracy_score(holdout["label"], predicted))
    return macro_f1(holdout["label"], predicted)


def macro_f1(truth: pd.Series, predicted) -> float:
    """Macro-F1 over the labels `truth` holds: a holdout without some labels (a golden set
    whose moved labels are skipped) is not scored 0 on a label it does not hold."""
    return float(f1_score(truth, predicted, labels=sorted(truth.unique()), average="macro",
                          zero_division=0))


GOLDEN_SEED = 7919
BATCH_SIZE = 16
# The quality figure of each kind of model: share of labels right, share of texts generated
# exactly as the reference.
QUALITY = {"classification": "accuracy", "causal-lm": "exact_match"}


def golden_set(tc: TaskConfig) -> pd.DataFrame:
    return datagen.generate(tc.dataset, "base", tc.golden_size, GOLDEN_SEED, priors=tc.label_priors)


def measure(predict: Callable[[pd.DataFrame], pd.DataFrame], golden: pd.DataFrame,
            kind: str) -> dict[str, float]:
    """Quality, mean confidence and the latency of one batch of `BATCH_SIZE` texts (p50, p99;
    after one warm-up batch; a last, smaller batch is not timed)."""
    predict(golden[["text"]].iloc[:BATCH_SIZE])
    outputs, seconds = [], []
    for start in range(0, len(golden), BATCH_SIZE):
        batch = golden[["text"]].iloc[start:start + BATCH_SIZE]
        began = time.perf_counter()
        outputs.append(predict(batch))
        if len(batch) == BATCH_SIZE or not seconds:
            seconds.append(time.perf_counter() - began)
    out = pd.concat(outputs, ignore_index=True)
    words = {}
    if kind == "classification":
        right = out["label"].to_numpy() == golden["label"].to_numpy()
    else:
        right = out["text"].str.strip().to_numpy() == golden["rewrite"].str.strip().to_numpy()
        words = {GENERATION_METRIC: float(token_f1s(out["text"], golden["rewrite"]).mean())}
    ms = np.array(seconds) * 1000
    return {QUALITY[kind]: float(right.mean()), **words,
            "confidence": float(out["confidence"].mean()),
            "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99))}
