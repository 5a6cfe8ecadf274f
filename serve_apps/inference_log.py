"""What a pipeline replica records for every answered request: one inference-log record per
text, built from the stage outputs it already has (no extra model call) and appended off the
request path, and the request metrics (counts by model and outcome, latency)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

from monitoring.log import INFERENCE, SegmentWriter, now
from serve_apps import metrics
from serve_apps.pii import redact
from training.features import DESCRIPTORS, descriptors

DEFAULT_TENANT = "default"


class InferenceLog:
    """A pipeline's log writer; `settings` is None when logging is off."""

    def __init__(self, application: str, settings: dict | None):
        self.application = application
        self.writer = SegmentWriter.from_settings(settings, INFERENCE) if settings else None

    async def record(self, request_id: str, texts: Sequence[str], decisions: list[dict],
                     stages: list[Mapping], started: float, outcome: str = "ok",
                     tenant: str = DEFAULT_TENANT) -> None:
        """One record per text and answering model: `decisions[i]` is the stage output the
        drift checks watch (its model, prediction, confidence, features, and a generator's
        answer as `output`), with, as records of their own, a shadowing challenger's answer
        (`shadow`) and a generator's answer that a classifier's decision led to (`generated`,
        `generated()`: a moderated post's rewrite); `stages[i]` every stage's model; `started`
        is the request's `time.perf_counter()` at arrival. Texts and answers are kept
        PII-redacted, or not at all (`keep_text: false`)."""
        seconds = time.perf_counter() - started
        for d in decisions:
            model = d.get("model") or {}
            metrics.request_answered(model.get("name"), model.get("version"), outcome)
        metrics.request_latency(((decisions[0] if decisions else {}).get("model") or {}).get("name"),
                                seconds)
        if self.writer is None:
            return
        ts, latency = now(), seconds * 1000

        def kept(text: str | None) -> str | None:
            return redact(text).text if text is not None and self.writer.config.keep_text \
                else None

        # a shadowing challenger's answer is a record of its own (variant `shadow`), so a
        # shadow canary is judged like a live one; readers leave it out unless they ask
        await self.writer.append([
            {**_row(request_id, i, ts, tenant, self.application, answer, s, latency, outcome),
             "text": kept(text), "output": kept(answer.get("output"))}
            for i, (d, s, text) in enumerate(zip(decisions, stages, texts))
            for answer in (d, d.get("shadow"), d.get("generated")) if answer is not None])

    @contextlib.asynccontextmanager
    async def on_failure(self, request_id: str, texts: Sequence[str], started: float,
                         tenant: str = DEFAULT_TENANT):
        """Around a request's work after validation: if it raises, its texts are logged with
        outcome `error` and the exception goes on."""
        try:
            yield
        except Exception:
            empty = [{}] * len(texts)
            await self.record(request_id, texts, empty, empty, started, "error", tenant)
            raise

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.close()


def generated(text: str, out: dict) -> dict:
    """A generator's answer to `text` (`Generator.generate`'s) as a log decision: what a
    reviewer corrects (`output`), how it ended, and its prompt's descriptors and embedding
    (what the generator's drift checks compare)."""
    return {"model": out.get("model"), "label": out.get("finish_reason"),
            "confidence": out.get("confidence"), "output": out.get("text"),
            "features": {**descriptors(text, out.get("prompt_tokens", 0)),
                         "embedding": out.get("embedding")}}


def _row(request_id: str, item: int, ts, tenant: str, application: str, decision: dict,
         stages: Mapping, latency_ms: float, outcome: str) -> dict:
    model = decision.get("model") or {}
    features = decision.get("features") or {}
    return {"request_id": request_id, "item": item, "ts": ts, "tenant": tenant,
            "application": application, "model": model.get("name"),
            "model_version": model.get("version"), "variant": model.get("variant"),
            "stages": {k: f"{_get(v, 'name')}/{_get(v, 'version')}" for k, v in stages.items()},
            **{d: features.get(d) for d in DESCRIPTORS}, "embedding": features.get("embedding"),
            "posterior": features.get("posterior"),
            "prediction": decision.get("label"), "confidence": decision.get("confidence"),
            "latency_ms": latency_ms, "outcome": outcome}


def _get(stage, key: str):
    return stage[key] if isinstance(stage, Mapping) else getattr(stage, key)
