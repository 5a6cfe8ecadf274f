"""The closed loop for one model: a durable state machine

    serving -> drift_suspected -> retraining -> evaluating -> canary -> promoting -> serving
                     |                |             |            |
                     |                +-> rejected  +-> rejected +-> rolled_back -> serving
                     +-> reweighted -> serving (a label shift: new priors, confirmed by labels)
                                   +-> drift_suspected (refuted: retrain)

`step()` looks at the world (the drift policy, the retrain's Ray job, the gate, the canary's
traffic in the inference log) and makes at most one transition. Every transition is appended to
the event log, recorded on the MLflow model version it concerns, and saved as the new state
(`cluster/state.py`) before anything else happens, and every action a state performs is
idempotent (a Ray job submitted under the retrain's id, an alias set, a swap to a pinned
version), so a controller killed anywhere and started again finishes or cleanly abandons the
step it was in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from cluster.canary import canary_verdict
from cluster.label_shift import LabelShiftSteps
from cluster.redistill import RedistillSteps
from cluster.retrain import RetrainSteps
from cluster.settings import CanaryPolicy, Settings
from cluster.state import BUSY, TRANSITIONS, ControllerState, StateStore, export
from training.errors import LLMOpsError
from training.refs import reference
from training.registry import CHALLENGER, CHAMPION, Registry

log = logging.getLogger(__name__)
DAY_S = 86400.0
PREVIOUS = "previous"  # alias of the champion before the last promotion (what rollback restores)


class Refused(LLMOpsError):
    """A manual command that cannot apply now; nothing was changed."""

    exit_code = 2


class Controller:
    """The loop for `model`. Serving is reached through Serve's REST API on the cluster's
    dashboard; retrains run as Ray jobs submitted there."""

    def __init__(self, settings: Settings, model: str, registry: Registry | None = None):
        self.settings, self.model = settings, model
        self.registry = registry or Registry(settings.registry, settings.data_dir)
        self.store = StateStore(settings.controller_uri)
        self.work = Path(settings.data_dir).resolve() / "retrain"
        self.label_shift = LabelShiftSteps(self)
        self.redistill = RedistillSteps(self)
        self.retrain = RetrainSteps(self)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> ControllerState:
        state = self.store.load(self.model)
        if state is None:
            state = ControllerState(model=self.model,
                                    champion=self.registry.alias_version(self.model, CHAMPION))
            self.store.save(state)
        return state

    def events(self) -> list[dict]:
        return self.store.events(self.model)

    def _to(self, state: ControllerState, new: str, reason: str, **changes) -> ControllerState:
        """One transition (one of `TRANSITIONS`): the event, the tag on the model version it
        concerns, the state."""
        if new not in TRANSITIONS[state.state]:
            raise AssertionError(f"{self.model}: no transition {state.state} -> {new}")
        now = time.time()
        event = {"ts": now, "model": self.model, "from": state.state, "to": new,
                 "reason": reason, "champion": changes.get("champion", state.champion),
                 "challenger": changes.get("challenger", state.challenger),
                 "retrain_id": changes.get("retrain_id", state.retrain_id)}
        self.store.append_event(event)
        version = event["challenger"] or event["champion"]
        if version is not None:
            try:
                self.registry.tag_version(self.model, version, {
                    "llmops.state": new, f"llmops.transition.{int(now * 1000)}":
                    f"{state.state} -> {new}: {reason}"[:5000]})
            except Exception:  # the event log and the state still hold the decision
                log.exception("could not tag %s v%s", self.model, version)
        self._mark_drift(state, new, changes)
        detail = {k: v for k, v in changes.pop("detail", state.detail).items() if k != "waiting"}
        if new == "serving":
            changes |= {"serving_since": now, "drift_onset": None}
        new_state = state.model_copy(update={"state": new, "since": now, "detail": detail,
                                             **changes})
        self.store.save(new_state)
        export(new_state, moved_from=state.state)
        log.warning("%s: %s -> %s (%s)", self.model, state.state, new, reason)
        return new_state

    def _mark_drift(self, state: ControllerState, new: str, changes: dict) -> None:
        """Tell the label queue which labels describe the traffic now: the champion carries
        the onset of the drift being handled until a version serves again (`Registry.
        mark_drift`; the queue counts only the labels since, as the retrain does)."""
        marks = {changes.get("champion", state.champion): changes["drift_onset"]} \
            if changes.get("drift_onset") else {}
        if new == "serving":
            marks = dict.fromkeys({state.champion, changes.get("champion", state.champion)})
        for version, onset in marks.items():
            if version is None:
                continue
            try:
                self.registry.mark_drift(self.model, version, onset)
            except Exception:  # the queue then counts older labels too, as before a drift
                log.exception("could not mark the drift on %s v%s", self.model, version)

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> ControllerState:
        """What the current state does: look, and make at most one transition."""
        handlers: dict[str, Callable[[ControllerState], ControllerState]] = {
            "serving": self._serving, "drift_suspected": self._drift_suspected,
            "reweighted": self.label_shift.confirm, "retraining": self.retrain.follow,
            "evaluating": self.retrain.evaluate, "canary": self._canary, "promoting": self._promoting,
            "rejected": self._rejected, "rolled_back": self._rolled_back}
        state = self.state()
        state = handlers[state.state](state)
        export(state)  # also after a restart, when no transition has happened yet
        return state

    def _serving(self, state: ControllerState) -> ControllerState:
        from monitoring.drift import NotEnoughData, check_model

        if state.distill_id:
            state = self.redistill.follow(state)
        try:
            decision = check_model(self.settings.log_uri, self.registry,
                                   self.settings.monitoring.drift, self.model,
                                   since=datetime.fromtimestamp(state.since, UTC), trace=True)
        except NotEnoughData:
            decision = None
        if decision is None or not decision.drift:
            return self.retrain.contradicted(state)
        return self._to(state, "drift_suspected",
                        f"drift in {decision.drifted_windows} of the last "
                        f"{len(decision.windows)} windows of v{decision.version}"
                        + (f" and the {len(decision.traced)} before them" if decision.traced
                           else ""),
                        trigger="drift", drift_onset=decision.onset,
                        detail={"drift": decision.windows[-1].to_dict() | {"html": None}})

    def _drift_suspected(self, state: ControllerState) -> ControllerState:
        cfg = self.settings.controller
        if cfg.label_shift.enabled and "label_shift_refuted" not in state.detail:
            state = self.label_shift.reweight(state)
            if state.state == "reweighted":
                return state
        now = time.time()
        today = [t for t in state.retrain_started if now - t < DAY_S]
        if len(today) >= cfg.max_retrains_per_day:
            return self._hold(state, f"budget: {len(today)} retrains in the last 24 h")
        if state.retrain_finished and now - state.retrain_finished < cfg.cooldown_s:
            until = time.localtime(state.retrain_finished + cfg.cooldown_s)
            return self._hold(state, f"cooldown until {time.strftime('%H:%M:%S', until)}")
        return self.retrain.start(state, "drift")

    def _hold(self, state: ControllerState, why: str) -> ControllerState:
        """Stay, saying why (saved once, not an event per step)."""
        if state.detail.get("waiting") != why:
            state = state.model_copy(update={"detail": {**state.detail, "waiting": why}})
            self.store.save(state)
        return state

    # the loop's Ray jobs (`cluster/retrain.py`, `cluster/redistill.py`) ----------------------------

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.settings.dashboard_address)

    def job_settings(self, folder: Path, source: str | None = None) -> Path:
        """The settings file a job of the loop runs with (written to `folder`): its driver joins
        this cluster, its workers take the retrain's resources; `source`: the model's task
        starts from it (a registered version) instead of its configured model."""
        settings = self.settings.model_copy(deep=True)
        if source is not None:
            settings.training = settings.training.starting_from(self.model, source)
        settings.ray.address = "auto"  # the job's driver joins the cluster it runs on
        settings.training.workers = self.settings.controller.retrain_workers
        settings.training.cpus_per_worker = self.settings.controller.retrain_cpus_per_worker
        settings.registry.tracking_uri = self.registry.tracking_uri
        settings.data_dir = Path(self.settings.data_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "llmops.yaml").write_text(yaml.safe_dump(settings.model_dump(mode="json")))
        return folder / "llmops.yaml"

    # canary and promotion ------------------------------------------------------------------------

    def serve(self):
        from serve_apps.deploy import ServeCluster

        return ServeCluster(self.settings.dashboard_address)

    def _set_canary(self, version: int | None, policy: CanaryPolicy | None = None) -> None:
        """Serve `version` beside the champion (None ends any canary). Idempotent."""
        from serve_apps.deploy import set_canary
        from serve_apps.model_config import CanaryConfig
        from training.refs import UnknownModel

        # an adapter's canary splits its requests: a request gets one version or the other
        adapter = self.settings.training.task(self.model).method == "lora"
        canary = None if version is None else CanaryConfig(
            model=reference(self.model, version), fraction=policy.fraction,
            shadow=policy.shadow and not adapter)
        try:
            set_canary(self.serve(), self.model, self.registry.tracking_uri, canary)
        except UnknownModel:
            pass  # not deployed: the canary waits for traffic (`llmops up`) or its timeout

    def _canary(self, state: ControllerState) -> ControllerState:
        from monitoring.log import FEEDBACK, read, with_feedback

        policy = self.settings.controller.canary
        since = datetime.fromtimestamp(state.canary_started, UTC)
        rows = with_feedback(read(self.settings.log_uri, model=self.model, since=since,
                                  shadow=True),
                             read(self.settings.log_uri, FEEDBACK, since=since))
        verdict, reason, stats = canary_verdict(rows, policy)
        if verdict is None:
            if time.time() - state.canary_started > policy.timeout_s:
                return self._to(state, "rolled_back", f"canary timed out: {reason}",
                                detail={**state.detail, "canary": stats})
            return self._hold(state, reason)
        return self._to(state, "promoting" if verdict else "rolled_back", "canary: " + reason,
                        detail={**state.detail, "canary": stats})

    def _promoting(self, state: ControllerState) -> ControllerState:
        """Move the aliases, then hot-swap every replica to the new champion (which also ends
        the canary). Both steps are idempotent: a restart repeats them."""
        from serve_apps.deploy import swap
        from training.refs import UnknownModel

        new, old = state.challenger, state.champion
        if self.registry.alias_version(self.model, CHAMPION) != new:
            self.registry.set_alias(self.model, PREVIOUS, old)
            self.registry.set_alias(self.model, CHAMPION, new)
        if self.registry.alias_version(self.model, CHALLENGER) == new:
            self.registry.set_alias(self.model, CHALLENGER, None)
        try:
            swapped = swap(self.serve(), self.model, self.registry.tracking_uri, version=new)
            self.registry.lineage.deployed(self.registry.tracking_uri, swapped["serving"],
                                           swapped["deployments"],
                                           f"{state.trigger or 'manual'}: v{new} replaces v{old}")
        except UnknownModel:
            pass  # not deployed: the next `llmops up` serves the champion
        distill_id = state.distill_id or self.redistill.submit()
        return self._to(state, "serving", f"v{new} is the champion (was v{old})"
                        + (f"; re-distilling its peak fallback ({distill_id})" if distill_id
                           else ""), champion=new, challenger=None, previous_champion=old,
                        canary_started=None, distill_id=distill_id)

    def _rejected(self, state: ControllerState) -> ControllerState:
        """The challenger (if any) never served: drop its alias and any canary."""
        return self._abandon(state, "the challenger was rejected")

    def _rolled_back(self, state: ControllerState) -> ControllerState:
        return self._abandon(state, "the canary ended; the champion serves everything")

    def _abandon(self, state: ControllerState, reason: str) -> ControllerState:
        self._set_canary(None)
        if state.challenger is not None and \
                self.registry.alias_version(self.model, CHALLENGER) == state.challenger:
            self.registry.set_alias(self.model, CHALLENGER, None)
        return self._to(state, "serving", reason, challenger=None, canary_started=None)

    # manual commands (the same transitions, recorded the same way) ------------------------------

    def retrain_now(self) -> ControllerState:
        state = self.state()
        if state.state in BUSY:
            raise Refused(f"{self.model} is {state.state} (since "
                          f"{time.strftime('%H:%M:%S', time.localtime(state.since))}); "
                          f"wait for it to finish")
        new = self.retrain.start(state, "manual")
        if new.state != "retraining":
            raise Refused(f"cannot retrain {self.model}: {new.detail.get('waiting')}")
        return new

    def promote(self) -> ControllerState:
        state = self.state()
        if state.state == "canary":
            return self._promoting(self._to(state, "promoting", "manual promotion"))
        challenger = self.registry.alias_version(self.model, CHALLENGER)
        if state.state in BUSY or challenger is None:
            raise Refused(f"{self.model} has no challenger to promote"
                          + (f" ({state.state})" if state.state in BUSY else ""))
        state = self._to(state, "promoting", f"manual promotion of v{challenger}",
                         trigger="manual", challenger=challenger,
                         champion=self.registry.alias_version(self.model, CHAMPION))
        return self._promoting(state)

    def rollback(self, to_version: int | None = None) -> ControllerState:
        state = self.state()
        if state.state == "canary" and to_version is None:
            return self._rolled_back(self._to(state, "rolled_back", "manual rollback"))
        if state.state in BUSY:
            raise Refused(f"{self.model} is {state.state}; roll back when it is serving")
        target = to_version if to_version is not None else \
            self.registry.alias_version(self.model, PREVIOUS)
        if target is None:
            raise Refused(f"{self.model} has no previous champion; name one with --to-version")
        known = [v["version"] for m in self.registry.models() if m["name"] == self.model
                 for v in m["versions"]]
        if target not in known:
            raise Refused(f"{self.model} has no version {target} (versions: "
                          f"{', '.join(map(str, known)) or 'none'})")
        champion = self.registry.alias_version(self.model, CHAMPION)
        if target == champion:
            raise Refused(f"v{target} is already the champion of {self.model}")
        state = self._to(state, "promoting", f"manual rollback to v{target}", trigger="manual",
                         challenger=target, champion=champion)
        return self._promoting(state)
