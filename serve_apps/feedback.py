"""The `feedback` application: ground-truth labels from human review for logged requests.

HTTP: `POST /v1/feedback {"request_id": ..., "label": ..., "item": 0}` -> 201; a generator's
answer takes `"correction": "the answer as it should have been"` instead of a label. Python:
`serve.get_app_handle("feedback").submit.remote({...})`. A request id the log does not hold is a
404, a label outside the answering model's label set a 422. `GET /v1/feedback/pending?limit=50
&model=...` (`pending` on the handle) is the caller's tenant's queue of answers awaiting a
label (or a generator's answers awaiting a correction), the most useful first
(`monitoring.feedback.pending`), each item leased to the caller for a while so the tenant's
other reviewers are handed other items (`monitoring.leases`).
"""

import asyncio
import functools
import logging
from datetime import UTC, datetime

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from monitoring.batching import unwrap
from monitoring.feedback import Label, feedback_rows
from monitoring.leases import leased_page
from monitoring.log import FEEDBACK, SegmentWriter, now
from serve_apps.auth import Principal
from serve_apps.call import Answer, Caller
from serve_apps.config import FeedbackAppConfig
from serve_apps.http import InvalidRequest, create_app, parse
from serve_apps.pii import redact
from serve_apps.pipeline import Pipeline

log = logging.getLogger(__name__)
MAX_CORRECTION = 8000  # characters: a generated answer's corrected text


class FeedbackRequest(BaseModel):
    """A label for a classifier's answer, or a generator's answer as it should have been."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128)
    label: str | None = Field(None, min_length=1, max_length=64)
    correction: str | None = Field(None, min_length=1, max_length=MAX_CORRECTION,
                                   description="a generated answer's corrected text")
    item: int = Field(0, ge=0, description="which text of a multi-text request")

    @model_validator(mode="after")
    def _one_of(self) -> "FeedbackRequest":
        if (self.label is None) == (self.correction is None):
            raise ValueError("send either a label (a classifier's answer) or a correction (a "
                             "generator's)")
        return self


class PendingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(50, ge=1, description="items wanted (at most the queue's max_limit)")
    model: str | None = Field(None, max_length=128, description="only this model's answers")
    since: datetime | None = Field(None, description="only answers from then on (ISO 8601; "
                                   "without a zone, UTC)")

    @field_validator("since")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        except (OverflowError, ValueError) as exc:
            raise ValueError(f"since is out of range: {exc}") from exc


class PendingItem(BaseModel):
    request_id: str
    item: int
    ts: str
    model: str
    model_version: str
    prediction: str = Field(description="a classifier's label; a generator's finish reason")
    confidence: float | None
    reason: str = Field(description="disagreement (champion and shadow), contradiction, "
                        "second (a lone confident mistake's second label), uncertain, or "
                        "coverage (the share of the page spread over the rest)")
    text: str | None = Field(description="the text as logged (PII redacted; null when the log "
                             "keeps no text)")
    output: str | None = Field(None, description="a generator's answer as logged, to correct")
    leased_until: str | None = Field(None, description="until when the tenant's other reviewers "
                                     "are handed other items (null: leases are off)")


class FeedbackReceipt(BaseModel):
    request_id: str
    item: int
    label: str | None
    corrected: bool = Field(False, description="a correction was stored (PII redacted)")
    accepted: bool = True


@functools.lru_cache(maxsize=64)
def _labels(tracking_uri: str, model: str, version: str) -> tuple[str, ...]:
    """A model version's label set (versions never change, so this caches for good)."""
    from training.registry import Registry

    return tuple(Registry.at(tracking_uri).labels(model, version))


def _drift_onset(tracking_uri: str, model: str, version: str) -> datetime | None:
    """The onset of the drift the loop is handling on a model version (read on each page: the
    controller sets and clears it), or None, also where the registry cannot say: the queue
    then counts every label, as it does before a drift."""
    from training.registry import Registry

    try:
        return Registry.at(tracking_uri).drift_onset(model, version)
    except Exception:
        log.warning("no drift onset of %s v%s from the registry", model, version, exc_info=True)
        return None


app = create_app("llmops feedback", "Ground-truth labels for logged requests.")


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64)
@serve.ingress(app)
class FeedbackService(Pipeline):
    """No model stages and no inference log of its own: it writes labels to the feedback log."""

    application, settings = "feedback", FeedbackAppConfig

    def __init__(self, log: dict, tracking_uri: str | None, config: dict | None = None,
                 governance: dict | None = None):
        super().__init__(app, {}, config, None, tracking_uri, None, governance)
        self.uri = log["uri"]
        self.writer = SegmentWriter.from_settings(log, FEEDBACK)
        self._paging = asyncio.Lock()  # one page at a time: its leases written before the next

    @app.post("/", response_model=FeedbackReceipt, status_code=201)
    async def http_submit(self, body: FeedbackRequest, request: Request) -> FeedbackReceipt:
        return await self._submit(body, Caller.http(request))

    @app.get("/pending", response_model=list[PendingItem])
    async def http_pending(self, request: Request, limit: int = 50, model: str | None = None,
                           since: str | None = None) -> list[dict]:
        return await self._pending({"limit": limit, "model": model, "since": since},
                                   Caller.http(request))

    async def pending(self, request: PendingRequest | dict, correlation_id: str | None = None,
                      principal: Principal | dict | None = None) -> list[dict]:
        return await self.admit("pending", request, correlation_id, principal,
                                lambda caller: self._pending(request, caller))

    async def _pending(self, request: PendingRequest | dict, caller: Caller) -> list[dict]:
        body = parse(PendingRequest, request)
        if body.limit > self.config.queue.max_limit:
            raise InvalidRequest(f"limit is at most {self.config.queue.max_limit}, got {body.limit}")

        async def page(call) -> Answer:
            async with self._paging:
                items = await asyncio.to_thread(
                    leased_page, self.uri, call.principal.tenant, call.principal.subject,
                    body.limit, self.config.queue, body.model, body.since,
                    functools.partial(_drift_onset, self.tracking_uri))
            return Answer([f"{len(items)} pending"], [{}], payload=items)

        _, answer = await self.policies.apply(
            "feedback", [f"pending {body.model or '*'} limit={body.limit}"], caller, page)
        return answer.payload

    async def submit(self, request: FeedbackRequest | dict, correlation_id: str | None = None,
                     principal: Principal | dict | None = None) -> FeedbackReceipt:
        return await self.admit("submit", request, correlation_id, principal,
                                lambda caller: self._submit(request, caller))

    async def _submit(self, request: FeedbackRequest | dict, caller: Caller) -> FeedbackReceipt:
        body = parse(FeedbackRequest, request)
        said = body.label if body.correction is None else f"corrected: {body.correction}"
        await self.policies.apply("feedback", [f"{body.request_id}#{body.item}: {said}"],
                                  caller, lambda call: self._store(body, call.principal.tenant))
        return FeedbackReceipt(request_id=body.request_id, item=body.item, label=body.label,
                               corrected=body.correction is not None)

    async def _store(self, body: FeedbackRequest, tenant: str) -> Answer:
        # a correction is stored as the log keeps texts: with personal data redacted
        correction = None if body.correction is None else redact(body.correction).text
        unwrap(await self._record(Label(body.request_id, body.item, body.label, tenant,
                                        correction)))
        return Answer([None], [{}])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _record(self, labels: list[Label]) -> list[dict | Exception]:
        """Concurrent labels are checked with one read of the log and written as one segment
        (a group commit): 201 only once a label is on disk, each bad label failing alone."""
        checked = await asyncio.to_thread(feedback_rows, self.uri,
                                          functools.partial(_labels, self.tracking_uri), labels)
        rows = [{**row, "ts": now()} for row in checked if isinstance(row, dict)]
        if rows:
            await self.writer.append(rows)
            await self.writer.flush()
        return checked

    async def __del__(self) -> None:
        await self.writer.close()
