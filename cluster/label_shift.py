"""Whether drift is a label shift the champion can answer with new class priors, and whether
the labels that arrive afterwards confirm it (`detect`, `confirm`: pure), and the controller's
steps that read the log and act on the answers (`LabelShiftSteps`).

A label shift changes how often each label comes, not what each label's inputs look like. So
the priors are re-estimated by EM from the logged posteriors of unlabelled traffic
(`training/priors.py`), the reference profile is drawn again in the new proportions, and the
same Evidently drift check runs on the recent window against it: if the drift it shows against
the profile as trained is gone, the new priors explain it. Feedback labels then judge the
adjusted answers by the drift check's own rule: their accuracy may not fall below their
calibrated confidence (`monitoring/drift.py`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from cluster.settings import LabelShiftPolicy
from monitoring.config import DriftConfig
from monitoring.drift import NotEnoughData, accuracy_shortfall, check_window
from training import priors as em

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shift:
    priors: dict[str, float]    # re-estimated (what serving adjusts to)
    training: dict[str, float]  # the reference profile's label frequencies
    moved: float                # total variation distance between the two
    rows: int                   # unlabelled requests the estimate comes from

    @property
    def weights(self) -> dict[str, float]:
        return em.ratios(self.priors, self.training)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        moves = sorted(self.priors, key=lambda k: -abs(self.priors[k] - self.training[k]))[:4]
        return ", ".join(f"{k} {self.training[k]:.2f}->{self.priors[k]:.2f}" for k in moves)


def detect(window: pd.DataFrame, reference: pd.DataFrame, labels: list[str],
           policy: LabelShiftPolicy, drift: DriftConfig, model: str, version: str) -> Shift | None:
    """The label shift that explains the drift of `window` (the champion's newest logged
    requests, with their `posterior`) from `reference` (its profile, with true labels), or
    None: the priors did not move enough, the window does not drift from the profile (the
    drift was declared on earlier windows: nothing here for priors to explain), or moving them
    leaves drift behind. A concept-shift retrain's version, its first small window read as
    drift on descriptors and its next on labels, took priors that had moved 0.09 but
    explained neither, for a label shift, and kept the miss those labels showed (0.977 of
    clean, no retrain; docs/closed-loop.md)."""
    window = window[window.posterior.notna()]
    if len(window) < drift.min_rows:
        return None
    train = em.training_priors(labels, reference.label)
    new = em.estimate(np.stack(window.posterior.to_numpy()), train)
    moved = float(0.5 * np.abs(new - train).sum())
    if moved < policy.min_shift:
        return None

    def drifts(profile: pd.DataFrame) -> bool:
        return check_window(window, profile, drift.thresholds_for(model), model=model,
                            version=version, min_rows=drift.min_rows,
                            sample_rows=drift.sample_rows).drifted

    try:  # the redrawn profile only where the window drifts from the trained one
        if not drifts(reference) or drifts(em.resample(reference, labels, new)):
            return None
    except NotEnoughData:
        return None
    return Shift(priors={k: round(float(q), 6) for k, q in zip(labels, new)},
                 training={k: round(float(p), 6) for k, p in zip(labels, train)},
                 moved=round(moved, 4), rows=len(window))


def confirm(labelled: pd.DataFrame, reference: pd.DataFrame,
            policy: LabelShiftPolicy) -> tuple[bool | None, str]:
    """Whether labelled answers (log rows with a feedback `label`: the adjusted ones since the
    priors moved, or the champion's since the drift began, which new priors would change only
    near its boundaries) are as accurate as their calibrated confidence says, as on the
    reference rows; None while fewer than `min_labels` have come."""
    if len(labelled) < policy.min_labels:
        return None, f"{len(labelled)} of {policy.min_labels} labels to confirm the new priors"
    shortfall = accuracy_shortfall(labelled, reference, policy.max_accuracy_drop)
    accuracy = float((labelled.prediction == labelled.label).mean())
    return not shortfall.drifted, (
        f"feedback accuracy {accuracy:.3f} on {len(labelled)} labels, "
        f"{shortfall.value:+.3f} from their confidence")


class LabelShiftSteps:
    """The controller's two label-shift steps (`Controller` composes them): from
    `drift_suspected`, adjust the champion to the priors that explain the drift; in
    `reweighted`, wait for the labels that confirm them (back to `serving`) or refute them
    (`drift_suspected`, which then retrains)."""

    def __init__(self, controller):
        self.c = controller

    def reweight(self, state):
        """`reweighted` with the champion's answers adjusted; else `state`: not a label shift,
        or one the labels since the drift began already refute (saved in its detail). The
        window carries its feedback labels too, but the label queue answers behind the traffic:
        a concept shift's newest window can hold too few while its earlier labels show it."""
        from monitoring.log import FEEDBACK, read, with_feedback

        c = self.c
        drift, policy = c.settings.monitoring.drift, c.settings.controller.label_shift
        version = str(state.champion)
        reference = c.registry.reference_profile(c.model, version)
        refuted, reason = confirm(self._labelled(state.drift_onset or state.serving_since,
                                                 state.champion), reference, policy)
        if refuted is False:
            log.warning("%s: label shift refuted before any answer was adjusted: %s", c.model,
                        reason)
            state = state.model_copy(update={"detail": {**state.detail,
                                                        "label_shift_refuted": reason}})
            c.store.save(state)
            return state
        since = _moment(state.serving_since)
        window = with_feedback(read(c.settings.log_uri, model=c.model, outcome="ok",
                                    since=since, last=drift.window),
                               read(c.settings.log_uri, FEEDBACK, since=since))
        shift = detect(window[window.model_version == version], reference,
                       c.registry.labels(c.model, version), policy, drift, c.model, version)
        if shift is None:
            return state
        self._set_priors(state.champion, shift)
        return c._to(state, "reweighted", f"label shift explains the drift: priors re-estimated "
                     f"from {shift.rows} requests ({shift.describe()}); answers adjusted, no "
                     f"retrain", detail={**state.detail, "label_shift": shift.to_dict()})

    def _labelled(self, since: float | None, champion: int) -> pd.DataFrame:
        """The champion's logged answers since `since` that carry a feedback label."""
        from monitoring.log import FEEDBACK, read, with_feedback

        c, at = self.c, _moment(since)
        rows = with_feedback(read(c.settings.log_uri, model=c.model, outcome="ok", since=at),
                             read(c.settings.log_uri, FEEDBACK, since=at))
        return rows[(rows.model_version == str(champion)) & rows.label.notna()]

    def _set_priors(self, version: int, shift: Shift | None) -> None:
        """The version's priors as the registry records them (what drift checks read) and as
        its replicas apply them (a hot user_config change); None: the training priors again.
        Idempotent."""
        from serve_apps.deploy import set_priors
        from training.refs import PRIOR_WEIGHTS_TAG, UnknownModel
        from training.registry import PRIORS_TAG

        c = self.c  # recorded first: a redeploy serves them too (`serve_apps.apps`)
        c.registry.tag_version(c.model, version, {
            PRIORS_TAG: json.dumps(shift.priors if shift else {}),
            PRIOR_WEIGHTS_TAG: json.dumps(shift.weights if shift else {})})
        try:
            set_priors(c.serve(), c.model, version, shift.weights if shift else None)
        except UnknownModel:
            pass  # not deployed: nothing answers yet

    def clear(self, version: int) -> None:
        """Serve `version` with the priors it was trained on again (what a benchmark does
        before each scenario)."""
        self._set_priors(version, None)

    def confirm(self, state):
        c, policy = self.c, self.c.settings.controller.label_shift
        shift = state.detail["label_shift"]
        verdict, reason = confirm(self._labelled(state.since, state.champion),
                                  c.registry.reference_profile(c.model, state.champion), policy)
        if verdict is None:
            if time.time() - state.since > policy.timeout_s:
                return c._to(state, "serving", f"label shift unconfirmed ({reason}); the new "
                             f"priors stay", detail={"label_shift": shift})
            return c._hold(state, reason)
        if verdict:
            return c._to(state, "serving", f"label shift confirmed: {reason}",
                         detail={"label_shift": shift})
        self._set_priors(state.champion, None)  # the trained priors again, until a retrain
        return c._to(state, "drift_suspected", f"label shift refuted: {reason}; retrain",
                     detail={**state.detail, "label_shift_refuted": reason})


def _moment(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)
