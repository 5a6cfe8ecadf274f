"""Drift of a served model's traffic against its reference profile, one window at a time.

The reference profile is the model version's view of labelled held-out rows of its training
distribution (descriptors, predictions, confidence, projected embeddings, true labels), stored
with the version in MLflow at registration; a version retrained on drift also profiles the
drifted traffic it was retrained to serve (unlabelled), and live inputs are compared with that.
Per window Evidently computes: data drift of the text descriptors (share of drifted columns),
drift of the predicted class (Jensen-Shannon distance) and of confidence (Wasserstein distance
normed by the reference's spread, and energy distance: both must pass), and embedding drift
(MMD, the fast method: see `bench/drift.py`); next to them the KL divergence of the
predicted-class distribution and, when the window has enough feedback labels, how far their
accuracy falls (beyond chance) below what the model's calibrated confidence promised for those
very rows (concept shift changes the right answers, not the inputs; comparing each labelled
row with its own confidence keeps the metric fair however the labels were asked for, the
uncertain ones first or at random). A window drifts when any metric passes its threshold;
drift is *declared* when `k` of the last `n` windows drifted (hysteresis: one noisy window does
not trigger a retrain).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import takewhile
from pathlib import Path

import numpy as np
import pandas as pd

from monitoring.config import DriftConfig, DriftThresholds
from monitoring.feedback import MIN_LABELS, correction_scores
from training.errors import LLMOpsError
from training.features import DESCRIPTORS, SERVED


class NotEnoughData(LLMOpsError):
    """A window with fewer requests than `min_rows`: no verdict either way."""

    status = 422


@dataclass
class Metric:
    name: str
    value: float
    threshold: float
    drifted: bool
    method: str


@dataclass
class DriftReport:
    """One window's verdict."""

    model: str
    version: str
    rows: int
    sampled: int
    start: str
    end: str
    metrics: list[Metric]
    drifted: bool
    seconds: float
    html: str | None = None
    labelled: int = 0

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    """The policy's answer over the last `n` windows."""

    model: str
    version: str
    drift: bool
    drifted_windows: int
    windows: list[DriftReport] = field(default_factory=list)
    k: int = 2
    n: int = 3
    traced: list[DriftReport] = field(default_factory=list)  # drifted windows before `windows`

    @property
    def onset(self) -> float | None:
        """When the drift began, as far as the windows tell: the first drifted one's start (a
        Unix time), the windows traced back included."""
        start = next((w.start for w in self.traced + self.windows if w.drifted), None)
        return None if start is None else pd.Timestamp(start).timestamp()

    def to_dict(self) -> dict:
        return asdict(self)


def scalar_frame(df: pd.DataFrame, answers: bool = True) -> pd.DataFrame:
    """Descriptors, and (`answers`) prediction and confidence, typed for Evidently."""
    numeric = DESCRIPTORS + (["confidence"] if answers else [])
    out = df[numeric + (["prediction"] if answers else [])].reset_index(drop=True).copy()
    out[numeric] = out[numeric].astype(float)
    if answers:
        out["prediction"] = out["prediction"].astype(str)
    return out


def embedding_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One column per dimension of the projected embeddings (what Evidently's methods take)."""
    emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    return pd.DataFrame(emb, columns=[f"e{i}" for i in range(emb.shape[1])])


def _metric(name: str, value: float, threshold: float, method: str, digits: int = 4) -> Metric:
    return Metric(name, round(float(value), digits), threshold, bool(value >= threshold), method)


def kl_divergence(current: pd.Series, reference: pd.Series, labels: list[str]) -> float:
    """KL(current || reference) of two categorical samples, add-one smoothed, in nats."""
    p = current.value_counts().reindex(labels, fill_value=0).to_numpy() + 1.0
    q = reference.value_counts().reindex(labels, fill_value=0).to_numpy() + 1.0
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def check_window(current: pd.DataFrame, reference: pd.DataFrame, thresholds: DriftThresholds,
                 *, model: str, version: str, min_rows: int, sample_rows: int = 2000,
                 html_path: Path | None = None) -> DriftReport:
    """Evidently's drift metrics for one window of logged requests (rows of the inference log,
    optionally with `label` or `correction` columns from feedback) against the reference
    profile: the inputs and answers against its `inputs`, the feedback against its labelled
    rows. A generator's profile holds its prompts' descriptors and embeddings and its answers
    to held-out prompts beside their references (no class): its prompts drift, and its
    corrected answers lose words against what it wrote on held-out prompts."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    if len(current) < min_rows:
        raise NotEnoughData(f"the window holds {len(current)} requests of {model}; a drift check "
                            f"needs at least {min_rows}")
    started = time.perf_counter()
    sample = current.sample(n=sample_rows, random_state=0) if len(current) > sample_rows else current
    profile, reference = reference, inputs(reference)
    answers = bool(reference.prediction.notna().all())  # a class and its confidence
    definition = DataDefinition(numerical_columns=DESCRIPTORS + ["confidence"] * answers,
                                categorical_columns=["prediction"] * answers)
    t = thresholds
    report = Report([
        DriftedColumnsCount(columns=DESCRIPTORS, method="wasserstein", threshold=t.descriptor_drift),
        *([ValueDrift(column="prediction", method="jensenshannon", threshold=t.prediction_drift),
           ValueDrift(column="confidence", method="wasserstein", threshold=t.confidence_drift),
           ValueDrift(column="confidence", method="ed", threshold=t.confidence_energy)]
          if answers else [])])
    snapshot = report.run(*(Dataset.from_pandas(scalar_frame(df, answers), data_definition=definition)
                            for df in (sample, reference)))
    share, *drifts = [m["value"] for m in json.loads(snapshot.json())["metrics"]]
    metrics = [_metric("share_of_drifted_descriptors", share["share"],
                       t.share_of_drifted_descriptors, "evidently:wasserstein"),
               *([_metric("prediction_drift", drifts[0], t.prediction_drift,
                          "evidently:jensenshannon"), *_confidence_drift(*drifts[1:], t)]
                 if answers else []),
               *_embedding_drift(sample, reference, t.embedding_drift)]
    if answers:
        predicted, expected = current["prediction"].astype(str), reference["prediction"].astype(str)
        kl = kl_divergence(predicted, expected, sorted(set(expected) | set(predicted)))
        metrics.append(_metric("kl_divergence", kl, t.kl_divergence, "kl(current||reference)"))
    feedback, labelled = _feedback_drift(current, profile, t.feedback_accuracy_drop)
    html = None
    if html_path is not None:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html_path))
        html = str(html_path)
    return DriftReport(model=model, version=version, rows=len(current), sampled=len(sample),
                       start=str(current.ts.min()), end=str(current.ts.max()),
                       metrics=metrics + feedback, drifted=any(m.drifted for m in metrics + feedback),
                       seconds=round(time.perf_counter() - started, 3), html=html,
                       labelled=labelled)


def _confidence_drift(normed: float, energy: float, t: DriftThresholds) -> list[Metric]:
    """Confidence drifts when it moved both against the reference's spread (Wasserstein normed
    by its standard deviation) and in confidence itself (energy distance, unnormed): a
    confident version's confidences sit within a hundredth of each other, so a handful of
    doubts passes the first alone (0.44 of 0.3 on a promoted version's clean traffic, energy
    0.010), and a widely spread one's noise would pass the second alone (`bench/drift.py`)."""
    drifted = bool(normed >= t.confidence_drift and energy >= t.confidence_energy)
    return [Metric("confidence_drift", round(float(normed), 4), t.confidence_drift, drifted,
                   "evidently:wasserstein"),
            Metric("confidence_energy", round(float(energy), 4), t.confidence_energy, drifted,
                   "evidently:ed")]


def _embedding_drift(sample: pd.DataFrame, reference: pd.DataFrame,
                     threshold: float) -> list[Metric]:
    """The MMD of the window's embeddings against the reference's, where both have them (a
    generator's fallback answers have none). Evidently's MMD method, called directly: its
    EmbeddingsDrift metric also fits a t-SNE for its plot, 95% of a check's time (7 of 7.7 s on
    a 2k-row window)."""
    from evidently.metrics.embeddings import MMDDriftMethod

    embedded = sample[sample.embedding.notna()]
    if not reference.embedding.notna().all() or len(embedded) < len(sample) // 2:
        return []
    mmd = MMDDriftMethod(threshold=threshold)(embedding_frame(embedded),
                                               embedding_frame(reference))[0]
    return [_metric("embedding_drift", mmd, threshold, "evidently:mmd", digits=5)]


def _feedback_drift(current: pd.DataFrame, profile: pd.DataFrame, threshold: float
                    ) -> tuple[list[Metric], int]:
    """The feedback's metrics, each once 30 answers have it (a classifier's labels, a
    generator's corrections), and how many answers have feedback."""
    metrics = []
    labelled = current.dropna(subset=["label"]) if "label" in current else current.iloc[:0]
    if len(labelled) >= MIN_LABELS and "label" in profile and profile.label.notna().any():
        metrics.append(accuracy_shortfall(labelled, profile, threshold))
    corrected = correction_scores(current)
    if len(corrected) >= MIN_LABELS and len(held := correction_scores(profile)):
        metrics.append(quality_shortfall(corrected, held, threshold))
    return metrics, len(labelled) + len(corrected)


def inputs(reference: pd.DataFrame) -> pd.DataFrame:
    """The reference rows live inputs are compared with: the drifted traffic a retrained version
    was retrained to serve, where its profile holds some (`training.retrain`); else its held-out
    rows."""
    served = reference[SERVED].eq(True) if SERVED in reference else None
    return reference[served] if served is not None and served.any() else reference


def accuracy_shortfall(labelled: pd.DataFrame, reference: pd.DataFrame,
                       threshold: float) -> Metric:
    """How far the accuracy of labelled answers falls below the mean of their calibrated
    confidence (beyond the reference rows' own gap between the two): about 0 while the world is
    the one the model was calibrated on, whichever answers were chosen for labelling (by
    confidence or at random). It drifts past `threshold` and three standard errors of chance
    (each answer right with the probability its confidence says), a control chart's limit: a
    few labels of hard answers are not evidence, and one temperature leaves the least
    confident answers of a small model overconfident by about two standard errors."""
    confidence = labelled.confidence.to_numpy(float)
    reference = reference.dropna(subset=["label"])  # served traffic has no true label
    gap = float(reference.confidence.mean() - (reference.prediction == reference.label).mean())
    value = float(confidence.mean() - (labelled.prediction == labelled.label).mean() - gap)
    chance = float(np.sqrt((confidence * (1 - confidence)).sum()) / len(confidence))
    return Metric("feedback_accuracy_drop", round(value, 4), threshold,
                  value > max(threshold, 3 * chance), "confidence - feedback accuracy")


def quality_shortfall(corrected: np.ndarray, held_out: np.ndarray, threshold: float) -> Metric:
    """How far a generator's corrected answers' token F1 (each against its correction) falls
    below that of its answers to held-out prompts against their references: past `threshold`
    and three standard errors of the difference, as for a classifier's labels."""
    value = float(held_out.mean() - corrected.mean())
    chance = float(np.sqrt(corrected.var() / len(corrected) + held_out.var() / len(held_out)))
    return Metric("feedback_quality_drop", round(value, 4), threshold,
                  value > max(threshold, 3 * chance), "held-out - corrected token F1")


def windows(log: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    """Consecutive windows of `size` requests ending with the newest request, oldest first; only
    the oldest can be partial."""
    return [log.iloc[max(0, end - size):end] for end in reversed(range(len(log), 0, -size))]


def decide(reports: list[DriftReport], config: DriftConfig, model: str, version: str) -> Decision:
    """Drift when `k` of the last `n` windows (of at least `min_rows` each) drifted."""
    recent = reports[-config.n:]
    drifted = sum(r.drifted for r in recent)
    return Decision(model=model, version=version, drift=drifted >= config.k,
                    drifted_windows=drifted, windows=recent, k=config.k, n=config.n)


def reweighted(reference: pd.DataFrame, priors: dict[str, float] | None) -> pd.DataFrame:
    """The reference profile as the served version sees its world: after the loop adjusted
    it to a label shift (`priors`), drawn again in the new label proportions and answered as
    serving answers (the posterior adjusted to them: its prediction and confidence; the logged
    `posterior` stays the trained one), so the shift it already answers is not drift any
    more. Its unadjusted confidence read as drift (Wasserstein 0.9 of 0.3) on the very traffic
    whose priors the labels had just confirmed."""
    from training.priors import adjust, ratios, resample, training_priors, weights

    if not priors:
        return reference
    labels = list(priors)
    drawn = resample(reference, labels, np.array(list(priors.values())))
    if "posterior" not in drawn or drawn.posterior.isna().any():
        return drawn
    trained = dict(zip(labels, training_priors(labels, reference.label)))
    answered = adjust(np.stack(drawn.posterior.to_numpy()),
                      weights(labels, ratios(priors, trained)))  # serving's weights
    return drawn.assign(prediction=[labels[i] for i in answered.argmax(axis=1)],
                        confidence=answered.max(axis=1))


def version_reference(registry, config: DriftConfig, model: str, version: str) -> pd.DataFrame:
    """What a version's windows are checked against: its reference profile as it answers now
    (`reweighted` to the priors it serves), at most `reference_rows` of it."""
    reference = reweighted(registry.reference_profile(model, version),
                           registry.priors(model, version))
    if len(reference) > config.reference_rows:
        reference = reference.sample(n=config.reference_rows, random_state=0)
    return reference


def check_model(log_uri: str, registry, config: DriftConfig, model: str, *,
                window: int | None = None, report_dir: Path | None = None,
                since: datetime | None = None, trace: bool = False) -> Decision:
    """Run the policy on the inference log as it is now: the model version that served the
    latest request, its last `n` windows (the newest ends with the latest request; a window
    below `min_rows` is skipped), feedback joined, against that version's reference profile.
    The newest window's Evidently report is saved as HTML under `report_dir`. With `since`,
    only requests from then on count. With `trace`, a drift whose oldest window drifted too is
    traced back through up to `onset_lookback` earlier windows (its onset, `Decision.onset`):
    traffic may have outrun the checks."""
    from monitoring.log import FEEDBACK, read, with_feedback

    size = window or config.window
    if size < config.min_rows:
        raise LLMOpsError(f"a window of {size} requests is below min_rows ({config.min_rows}): "
                          f"no window could ever be checked")
    log = read(log_uri, model=model, outcome="ok", since=since)
    if log.empty:
        raise NotEnoughData(f"the inference log at {log_uri} holds no requests of {model!r}")
    version = str(log.model_version.iloc[-1])
    log = with_feedback(log[log.model_version == version], read(log_uri, FEEDBACK))
    checkable = [w for w in windows(log, size) if len(w) >= config.min_rows]
    full, earlier = checkable[-config.n:], checkable[:-config.n][::-1][:config.onset_lookback]
    if not full:
        raise NotEnoughData(f"{model} version {version} has {len(log)} logged requests; a drift "
                            f"check needs a window of at least {config.min_rows}")
    reference = version_reference(registry, config, model, version)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def check(window: pd.DataFrame, html_path: Path | None = None) -> DriftReport:
        return check_window(window, reference, config.thresholds_for(model), model=model,
                            version=version, min_rows=config.min_rows,
                            sample_rows=config.sample_rows, html_path=html_path)

    reports = [check(w, report_dir / f"{model}-v{version}-{stamp}.html"
                     if report_dir is not None and i == len(full) - 1 else None)
               for i, w in enumerate(full)]
    decision = decide(reports, config, model, version)
    if trace and decision.drift and reports[0].drifted:
        decision.traced = list(takewhile(lambda r: r.drifted, map(check, earlier)))[::-1]
    return decision
