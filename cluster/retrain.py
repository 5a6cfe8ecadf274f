"""The loop's retrain: the training set assembled from the champion's labelled traffic, the
fine-tune run as a Ray job named by the retrain id, and the gate that judges its version.
States `retraining` and `evaluating` of the controller (`cluster/controller.py`)."""

from __future__ import annotations

import functools
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import pandas as pd

from cluster.state import ControllerState
from training import lineage
from training.refs import RETRAIN_TAG, reference, resolve
from training.registry import CHAMPION, GOLDEN_FILE, REFERENCE_FILE


class RetrainSteps:
    """The controller's retrain (`Controller` composes it): `start` it from drift or by hand,
    `follow` its job, `evaluate` its version."""

    def __init__(self, controller):
        self.c = controller

    def start(self, state: ControllerState, trigger: str) -> ControllerState:
        """Assemble the training set, then hand over to `retraining` (which submits the job)."""
        from training import teacher
        from training.errors import InvalidData
        from training.retrain import generation_retraining_data, retraining_plan

        c = self.c
        champion = c.registry.alias_version(c.model, CHAMPION)
        recent = self._recent(state)
        onset = datetime.fromtimestamp(state.drift_onset, UTC) \
            if trigger == "drift" and state.drift_onset else None
        rest = self._beside(champion)
        classifier = c.settings.training.task(c.model).kind == "classification"
        try:
            # built once; the teacher (a fine-tune) only once the retrain goes ahead: fitted at
            # each step while the retrain waits for labels, it made each step a fine-tune that
            # held the controller (the loop benchmark, paced by its steps, sent a batch in
            # 105-141 s instead of 30, so fewer labels came before `label_wait_s`)
            if not classifier:
                data = generation_retraining_data(recent, *rest, onset=onset)
            else:
                planned = retraining_plan(recent, *rest, onset=onset)
                waiting = self._waiting(recent, planned.notes) if trigger == "drift" else None
                if waiting and time.time() - state.since < c.settings.controller.label_wait_s:
                    return c._hold(state, f"waiting for labels: {waiting}")
                judged = planned.judge(functools.partial(
                    teacher.fit, c.settings.training, c.registry, c.model,
                    reference(c.model, champion)))
                # the check and the teacher take minutes in a busy loop (3.7 in one benchmark
                # run, when a third of its labels came): the set is built on those too
                fresh = self._recent(state)
                if fresh.label.notna().sum() > recent.label.notna().sum():
                    recent, planned = fresh, retraining_plan(fresh, *rest, onset=onset)
                data = planned.data(judged)
        except InvalidData as exc:
            return c._hold(state, str(exc))
        retrain_id = f"retrain-{c.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        data.sources = self._sources(recent, champion)
        data.save(c.work / retrain_id / "data")
        c.registry.lineage.emit("START", *lineage.retrain_run(c.model, retrain_id),
                                data.sources, description=f"{trigger}: retrain {c.model}")
        shift = data.notes.get("concept_shift")
        return c._to(state, "retraining",
                     f"{trigger}: fine-tune on {len(data.train)} rows "
                     f"({len(data.holdouts['recent'])} recent "
                     f"{'labelled' if classifier else 'corrected'} held out)"
                     + (f"; concept shift, feedback contradicts: {shift}" if shift else ""),
                     trigger=trigger, champion=champion, challenger=None,
                     retrain_id=retrain_id, retrain_started=[*state.retrain_started, time.time()],
                     detail={k: v for k, v in data.notes.items()
                             if k in ("contradictions", "label_mistakes", "teacher_relabelled")})

    def _beside(self, champion: int) -> tuple:
        """What a retraining set takes beside the traffic: the champion's replay and golden set,
        the retrain's settings."""
        c = self.c
        return (c.registry.run_data(c.model, champion, REFERENCE_FILE),
                c.registry.run_data(c.model, champion, GOLDEN_FILE), c.settings.training.retrain,
                c.settings.training.seed)

    def contradicted(self, state: ControllerState) -> ControllerState:
        """`serving` with no drift: the labels since the loop came back to serving checked
        against the champion's training data every `controller.contradiction_labels` new ones
        (the retraining set's contradiction check). A move they show is a concept shift ->
        `drift_suspected`, its onset when serving began. The drift check judges each window's
        few labels against the champion's confidence alone: the phrasings of a move that a
        retrain's labels did not reach, kept under the old label, show there only once they
        are mistakes beyond chance in one window; here their labels add up."""
        from monitoring.log import FEEDBACK, read
        from training.errors import InvalidData
        from training.retrain import retraining_plan

        c = self.c
        every, config = c.settings.controller.contradiction_labels, c.settings.training.retrain
        if not every or not config.resolve_contradictions \
                or c.settings.training.task(c.model).kind != "classification":
            return state
        since = datetime.fromtimestamp(state.since, UTC)
        labelled = len(read(c.settings.log_uri, FEEDBACK, since=since))  # the labels given since
        # (when this serving began, the labels at the last check): a detail outlives its state
        checked = state.detail.get("contradiction_checked") or [None, 0]
        done = checked[1] if checked[0] == state.since else 0
        if labelled < max(config.min_labelled, done + every):
            return state
        state = state.model_copy(update={"detail": {
            **state.detail, "contradiction_checked": [state.since, labelled]}})
        c.store.save(state)
        champion = c.registry.alias_version(c.model, CHAMPION)
        try:
            notes = retraining_plan(self._recent(state), *self._beside(champion),
                                    onset=since).notes
        except InvalidData:
            return state
        if not notes.get("concept_shift"):
            return state
        return c._to(state, "drift_suspected", f"the {labelled} labels since v{champion} served "
                     f"contradict its training data: {notes['concept_shift']}", trigger="drift",
                     drift_onset=state.since, detail={
                         "contradictions": notes["contradictions"],
                         "label_shift_refuted": "the labels moved regions: not a label shift"})

    def _recent(self, state: ControllerState) -> pd.DataFrame:
        """The champion's own traffic with its feedback labels: what earlier champions were
        retrained on is in the replay."""
        from monitoring.log import FEEDBACK, read, with_feedback

        c = self.c
        since = None if state.serving_since is None else datetime.fromtimestamp(
            state.serving_since, UTC)
        return with_feedback(read(c.settings.log_uri, model=c.model, outcome="ok", since=since,
                                  last=c.settings.controller.recent_rows),
                             read(c.settings.log_uri, FEEDBACK))

    def _waiting(self, recent: pd.DataFrame, notes: dict) -> str | None:
        """Why a retrain on drift waits for labels, if it does: moves the labels cannot show
        yet (`_unseen_moves`), or a concept shift found on fewer labels since the onset than
        `controller.concept_shift_labels` (the first hundred reach only part of the moved
        regions, and what they miss keeps its old label in the replay)."""
        unseen = self._unseen_moves(recent, notes)
        if unseen:
            return ("feedback suggests " + ", ".join(f"{m} ({why})" for m, why in unseen.items())
                    + ", too few labels to tell a concept shift from noise")
        need = self.c.settings.controller.concept_shift_labels
        if notes.get("concept_shift") and notes["labelled"] < need:
            moved = ", ".join(notes["contradictions"]["moved"])
            return (f"a concept shift ({moved}) found on {notes['labelled']} labels since the "
                    f"drift; its retrain waits for {need}")
        return None

    def _unseen_moves(self, recent: pd.DataFrame, notes: dict) -> dict[str, str]:
        """The moves ("A -> B": why) the retraining set's contradiction check suspected but
        could not show (2 or more labelled rows in an A region say B: too few, or too thin a
        region), which 2 or more of the champion's confident mistakes also say, once those
        exceed chance (`monitoring.feedback.confident_mistakes`, the label queue's rule); and
        the moves it found whose replay rows rest more on single labels than on two or more
        (those rows it retires: the retrain would learn the move from the labelled rows
        alone). Once a concept shift is found, also the pairs 3 or more of those confident
        mistakes say that no move found explains: a reorganisation moves several intents, and
        the first labels show the largest move first (a retrain on them alone learnt one move
        of three, 0.80 of clean). The queue is asking about their regions; a retrain started
        now would average the move away. New inputs (no region of the training data, no move
        found) and ambiguous ones (rarely confident) do not hold it."""
        from monitoring.feedback import confident_mistakes

        wrong = confident_mistakes(recent[recent.label.notna()],
                                   self.c.settings.serve.feedback.queue.confident)
        said = Counter(f"{a} -> {b}" for a, b in zip(wrong.prediction, wrong.label))
        found = notes.get("contradictions", {}).get("moved", {})
        return {move: f"{n} labelled rows" for move, n in notes.get("suspected_moves", {}).items()
                if said[move] >= 2} | {move: f"{n} replay rows on one label each" for move, n
                                       in notes.get("thin_moves", {}).items()} | {
            move: f"{n} confident mistakes" for move, n in said.items()
            if found and n >= 3 and move not in found}

    def _submit(self, state: ControllerState) -> None:
        c = self.c
        folder = c.work / state.retrain_id
        config = c.job_settings(folder, self.source(state.champion))
        # (no runtime_env: the command sets the platform's environment for its own driver)
        c.job_client().submit_job(
            submission_id=state.retrain_id,
            entrypoint=(f"{sys.executable} -m cluster.cli train {c.model} --data "
                        f"{folder / 'data'} --config {config} "
                        f"--tag {RETRAIN_TAG}={state.retrain_id} --json"))

    def source(self, champion: int) -> str:
        """What a retrain fine-tunes: the champion's weights, not a fresh model. A LoRA task's
        champion is an adapter, not a base: a new adapter trains on the exact base the
        champion's was trained on (a registry base stays pinned to that version)."""
        ref = reference(self.c.model, champion)
        if self.c.settings.training.task(self.c.model).method == "lora":
            return resolve(ref, self.c.registry.tracking_uri).base
        return ref

    def follow(self, state: ControllerState) -> ControllerState:
        """`retraining`: the job's version registered -> `evaluating`; the job failed ->
        `rejected`; never submitted (a crash right after the transition) -> submit it now."""
        from ray.job_submission import JobStatus

        c = self.c
        version = c.registry.find_version(c.model, RETRAIN_TAG, state.retrain_id)
        run = lineage.retrain_run(c.model, state.retrain_id)
        if version is not None:
            c.registry.lineage.emit("COMPLETE", *run, outputs=[lineage.model_version(
                c.registry.tracking_uri, c.model, version)])
            return c._to(state, "evaluating", f"the retrain registered v{version}",
                         challenger=version, retrain_finished=time.time())
        client = c.job_client()
        try:
            status = client.get_job_status(state.retrain_id)
        except RuntimeError:  # never submitted (a crash right after the transition): submit
            self._submit(state)
            return state
        if status in (JobStatus.FAILED, JobStatus.STOPPED):
            tail = client.get_job_logs(state.retrain_id).strip().splitlines()[-1:] or [""]
            reason = f"the retrain job {status.value.lower()}: {tail[0][:300]}"
        elif status == JobStatus.SUCCEEDED:  # succeeded, yet no version: registration failed
            reason = "the retrain job ended without a new version"
        else:
            return state
        c.registry.lineage.emit("FAIL", *run, error=reason)
        return c._to(state, "rejected", reason, retrain_finished=time.time())

    def _sources(self, recent: pd.DataFrame, champion: int) -> list[lineage.Dataset]:
        """What a retrain reads: the champion's labelled traffic, the replay of its training
        data and its golden set (the registry's copies)."""
        c = self.c
        uri = c.registry.tracking_uri
        return [lineage.inference_log(c.settings.log_uri, c.model, len(recent),
                                      "recent answers and their feedback labels"),
                *(lineage.Dataset(uri, f"models:/{c.model}/{champion}/data/{file}",
                                  description=role)
                  for file, role in ((REFERENCE_FILE, "replay"), (GOLDEN_FILE, "golden set")))]

    def _adopt(self, state: ControllerState, champion, served: pd.DataFrame | None,
               result) -> str:
        """Where the champion answers the labels since the drift within the gate's tolerance of
        its golden set, the drifted traffic becomes what its inputs are compared with
        (`Registry.adopt_traffic`): the drift is one it already answers (slang, a reworded
        form), and against its old profile the same drift would start a retrain, rejected
        again, after each cooldown. A champion the labels find wrong (a concept shift the
        retrain failed to learn) keeps its profile: the drift stays declared. Returns what the
        transition's reason adds."""
        from training.calibration import temperature
        from training.features import reference_profile
        from training.retrain import ORIGINAL, RECENT

        held = result.champion[RECENT] >= result.champion[ORIGINAL] - self.c.settings.training \
            .gate.tolerance
        if served is None or served.empty or not held:
            return ""
        meta = champion.meta
        profile = reference_profile(champion.model, champion.tokenizer, served, meta["labels"],
                                    meta["max_length"], temperature=temperature(meta),
                                    served=True)
        self.c.registry.adopt_traffic(self.c.model, state.champion, profile,
                                      f"{state.retrain_id}: {result.reason}")
        return (f"; v{state.champion} answers the drifted traffic as well as its golden set "
                f"({result.champion[RECENT]:.4f} vs {result.champion[ORIGINAL]:.4f}): its "
                f"{len(profile)} requests since the drift are its drift reference now")

    def evaluate(self, state: ControllerState) -> ControllerState:
        """`evaluating`: the gate on the retrain's holdouts -> `canary`, or `rejected`."""
        from training.retrain import evaluate_pair
        from training.taskdata import TaskData

        c = self.c
        data = TaskData.load(c.work / state.retrain_id / "data")
        gate = c.settings.training.gate
        champion = c.registry.load_model(c.model, state.champion)
        result = evaluate_pair(champion, c.registry.load_model(c.model, state.challenger),
                               data.holdouts, gate)
        c.registry.tag_version(c.model, state.challenger, {
            "llmops.gate": "accepted" if result.promote else "rejected",
            "llmops.gate.reason": result.reason,
            **{f"llmops.gate.{who}.{h}": str(v) for who, scores in
               (("champion", result.champion), ("challenger", result.challenger))
               for h, v in scores.items()}})
        if not result.promote:
            return c._to(state, "rejected", "gate: " + result.reason
                         + self._adopt(state, champion, data.served, result), detail={
                             "gate": result.to_dict()})
        policy = c.settings.controller.canary
        c._set_canary(state.challenger, policy)
        return c._to(state, "canary", "gate: " + result.reason, canary_started=time.time(),
                     detail={"gate": result.to_dict()})
