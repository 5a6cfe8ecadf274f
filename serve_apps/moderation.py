"""The `moderation` application: classify a post; rewrite toxic posts into a safe version with the
generator; block spam; redact personal data from whatever text is returned.

HTTP: `POST /v1/moderate`. Python: `serve.get_app_handle("moderation").moderate.remote({...})`.
"""

import asyncio
import time

from fastapi import Request
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps import metrics
from serve_apps.config import LimitsConfig, ModerationAppConfig
from serve_apps.deployments import Item, set_batching
from serve_apps.http import StageModel, TextsRequest, create_app, new_request_id, request_texts
from serve_apps.inference_log import InferenceLog
from serve_apps.pii import redact


class Moderation(BaseModel):
    verdict: str
    flagged: bool
    action: str = Field(description="allow, rewrite, block or redact")
    confidence: float
    scores: dict[str, float]
    safe_text: str | None = Field(description="what may be shown; null when blocked")
    redactions: dict[str, int]
    models: dict[str, StageModel]


class ModerateResponse(BaseModel):
    request_id: str
    results: list[Moderation]


app = create_app("llmops moderation", "Classify posts; rewrite toxic ones; redact personal data.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ModerationPipeline:
    def __init__(self, classifier: DeploymentHandle, generator: DeploymentHandle, config: dict,
                 limits: dict, log: dict | None = None):
        self.classifier, self.generator = classifier, generator
        self.config = ModerationAppConfig.model_validate(config)
        self.limits = LimitsConfig.model_validate(limits)
        self.log = InferenceLog("moderation", log)
        set_batching(self._classify, **self.config.classifier.batching.model_dump())

    @app.post("/", response_model=ModerateResponse)
    async def http_moderate(self, body: TextsRequest, request: Request) -> ModerateResponse:
        return await self.moderate(body, request.state.request_id)

    async def moderate(self, request: TextsRequest | dict,
                       request_id: str | None = None) -> ModerateResponse:
        """Moderate every text of the request; the same for HTTP and handle callers."""
        texts = request_texts(request, self.limits)
        rid = new_request_id(request_id)
        started = time.perf_counter()
        async with self.log.on_failure(rid, texts, started):
            verdicts = await asyncio.gather(*(self._classify(Item(t, rid)) for t in texts))
            results = await asyncio.gather(*(self._finish(t, v, rid)
                                             for t, v in zip(texts, verdicts)))
        await self.log.record(rid, texts, verdicts, [r.models for r in results], started)
        for r in results:
            metrics.guardrail_action(r.action)
        return ModerateResponse(request_id=rid, results=results)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _classify(self, items: list[Item]) -> list[dict]:
        """Texts of concurrent requests go to the classifier in one call, not one call each."""
        return await self.classifier.predict_many.remote(items)

    async def _finish(self, text: str, verdict: dict, rid: str) -> Moderation:
        label = verdict["label"]
        models = {"classifier": StageModel(**verdict["model"])}
        if "shadow" in verdict:  # the challenger's answer is recorded, never returned as text
            models["classifier_shadow"] = StageModel(**verdict["shadow"]["model"])
        if label in self.config.block_labels:
            action, safe = "block", None
        elif label in self.config.rewrite_labels:
            rewrite = await self.generator.generate.remote(text, rid)
            action, safe = "rewrite", rewrite["text"]
            models["generator"] = StageModel(**rewrite["model"])
        else:
            action, safe = "allow", text
        found: dict[str, int] = {}
        if safe is not None:
            redaction = redact(safe)
            safe, found = redaction.text, redaction.found
            if action == "allow" and (found or label in self.config.redact_labels):
                action = "redact"
        return Moderation(verdict=label, flagged=label != "safe", action=action,
                          confidence=verdict["confidence"], scores=verdict["scores"],
                          safe_text=safe, redactions=found, models=models)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: nothing buffered is lost."""
        await self.log.close()
