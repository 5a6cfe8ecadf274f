"""The controller's durable state: one JSON document per model (replaced atomically and fsynced,
so a crash leaves the old or the new state, never half of one) and an append-only JSON-lines log
of every transition, under `<data_dir>/controller/` or any fsspec URI (object storage on a
cluster). A state file found corrupt is moved aside, never crash-looped on.

The state names the step in progress and everything needed to finish or abandon it after a
restart: the Ray job id of a retrain, the challenger version, when the canary started.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from monitoring.files import is_local, quarantine, write_atomic

State = Literal["serving", "drift_suspected", "reweighted", "retraining", "evaluating", "canary",
                "promoting", "rejected", "rolled_back"]
STATES: tuple[str, ...] = State.__args__
# Steps that own the model: a retrain, a manual promotion or a rollback waits until they end.
BUSY = ("retraining", "evaluating", "canary", "promoting")
# Every move the loop may make (`Controller._to` refuses any other): the automatic ones, and
# from a state that is not BUSY, a manual retrain or promotion (a rollback is a promotion).
_MANUAL = ("retraining", "promoting")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "serving": ("drift_suspected", *_MANUAL),
    "drift_suspected": ("reweighted", *_MANUAL),
    "reweighted": ("serving", "drift_suspected", *_MANUAL),  # a label shift, priors adjusted
    "retraining": ("evaluating", "rejected"),
    "evaluating": ("canary", "rejected"),
    "canary": ("promoting", "rolled_back"),
    "promoting": ("serving",),
    "rejected": ("serving", *_MANUAL),
    "rolled_back": ("serving", *_MANUAL),
}


class ControllerState(BaseModel):
    model: str
    state: State = "serving"
    since: float = Field(default_factory=time.time)
    serving_since: float | None = None  # when the loop last entered serving (None: never)
    drift_onset: float | None = None  # the drift's first window's start: a retrain learns since
    champion: int | None = None
    challenger: int | None = None
    previous_champion: int | None = None
    retrain_id: str | None = None     # names the Ray job and tags the version it registers
    retrain_started: list[float] = Field(default_factory=list)  # for the daily budget
    retrain_finished: float | None = None  # for the cooldown
    canary_started: float | None = None
    distill_id: str | None = None     # the Ray job re-distilling the peak fallback after a promotion
    trigger: str | None = None        # drift, manual
    detail: dict = Field(default_factory=dict)  # the last decision (gate, canary verdict, error)


class StateStore:
    def __init__(self, uri: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, model: str, suffix: str) -> str:
        return f"{self.root}/{model}{suffix}"

    def load(self, model: str) -> ControllerState | None:
        """The saved state; None when there is none, or when it was corrupt (moved aside with
        an error and the `LLMOpsStateFileCorrupt` alert: the loop starts again from serving)."""
        path = self._path(model, ".json")
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            text = f.read()
        try:
            return ControllerState.model_validate_json(text)
        except ValueError as exc:
            quarantine(path, f"unreadable controller state: {str(exc).splitlines()[0]}",
                       None if is_local(self.fs) else self.fs)
            return None

    def save(self, state: ControllerState) -> None:
        """Replace the state whole; on a local disk fsynced (file and folder) before it
        returns, so the step it names is on disk before the step runs."""
        if is_local(self.fs):
            write_atomic(Path(self._path(state.model, ".json")), state.model_dump_json(indent=1))
            return
        tmp = self._path(f".{state.model}.{uuid.uuid4().hex[:8]}", ".tmp")
        with self.fs.open(tmp, "w") as f:
            f.write(state.model_dump_json(indent=1))
        self.fs.mv(tmp, self._path(state.model, ".json"))

    def append_event(self, event: dict) -> None:
        """One line per transition (fsspec appends where the filesystem can; local files do,
        fsynced)."""
        line = json.dumps(event, default=str) + "\n"
        if is_local(self.fs):
            with open(self._path(event["model"], ".events.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            return
        with self.fs.open(self._path(event["model"], ".events.jsonl"), "a") as f:
            f.write(line)

    def events(self, model: str) -> list[dict]:
        path = self._path(model, ".events.jsonl")
        if not self.fs.exists(path):
            return []
        with self.fs.open(path, "r") as f:  # a line being appended (no newline yet) is not one
            return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def export(state: ControllerState, moved_from: str | None = None) -> None:
    """The state (and the transition into it) as metrics on Ray's export port, with a `ray_`
    prefix, where the controller runs in a Ray process (its actor, a driver); else nothing.

        ray_llmops_controller_state{model, state}               1 for the current state, else 0
        ray_llmops_controller_state_since_timestamp_seconds{model}
        ray_llmops_controller_transitions_total{model, from, to}
    """
    import ray

    from monitoring.gauges import hold
    from serve_apps.metrics import metric

    if not ray.is_initialized():
        return
    gauge = metric("gauge", "llmops_controller_state", "1 for the loop's current state.",
                    ("model", "state"))
    for name in STATES:  # held: the state stays visible between steps
        hold(gauge, float(name == state.state), {"model": state.model, "state": name})
    hold(metric("gauge", "llmops_controller_state_since_timestamp_seconds",
                "When the loop entered its current state.", ("model",)),
         state.since, {"model": state.model})
    if moved_from is not None:
        metric("counter", "llmops_controller_transitions", "Transitions of the loop.",
                ("model", "from", "to")).inc(
            tags={"model": state.model, "from": moved_from, "to": state.state})
