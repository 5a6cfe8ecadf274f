"""Re-distillation in the loop: after a promotion, a model with a peak fallback (a `fallback`
alias: its operator ran `llmops distill` once, `training/distill.py`) gets a student of the new
champion, trained as a Ray job while the loop goes on; serving takes it once its gate passed.
Not a state of the loop: the job's id rides in the state (`distill_id`) until it ends."""

from __future__ import annotations

import logging
import sys
import time
import uuid

from training.registry import FALLBACK

log = logging.getLogger(__name__)


class RedistillSteps:
    """The controller's re-distillation (`Controller` composes it): `submit` at a promotion,
    `follow` at each step while serving."""

    def __init__(self, controller):
        self.c = controller

    def submit(self) -> str | None:
        """Submit the job when the model has a `fallback`; its id."""
        c = self.c
        if c.registry.alias_version(c.model, FALLBACK) is None:
            return None
        distill_id = f"distill-{c.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        config = c.job_settings(c.work / distill_id)
        c.job_client().submit_job(
            submission_id=distill_id,
            entrypoint=f"{sys.executable} -m cluster.cli distill {c.model} --config {config}")
        return distill_id

    def follow(self, state):
        """Once the job ended: serve the new student if its gate passed (the job moved the
        alias), else keep the old one; the outcome under the state's `detail.distill`."""
        from ray.job_submission import JobStatus

        from serve_apps.deploy import repin_fallback
        from training.refs import UnknownModel

        c = self.c
        try:
            status = c.job_client().get_job_status(state.distill_id)
        except RuntimeError:  # lost with the cluster: the old student serves on
            status = JobStatus.FAILED
        if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return state
        fallback = c.registry.alias_version(c.model, FALLBACK)
        if status == JobStatus.SUCCEEDED:
            try:
                repin_fallback(c.serve(), c.model, c.registry.tracking_uri)
            except UnknownModel:
                pass  # not deployed: the next `llmops up` pins the alias
            log.warning("%s: the peak fallback is v%s, distilled from v%s", c.model, fallback,
                        state.champion)
        else:  # the gate refused the student (exit 1) or the job failed: the old one serves
            log.warning("%s: re-distillation %s %s; the fallback stays v%s", c.model,
                        state.distill_id, status.value.lower(), fallback)
        new = state.model_copy(update={"distill_id": None, "detail": {
            **state.detail, "distill": {"job": state.distill_id, "status": status.value,
                                        "fallback": fallback}}})
        c.store.save(new)
        return new
