"""The `moderation` application: classify a post; rewrite toxic posts into a safe version with the
generator; block spam; redact personal data from whatever text is returned.

HTTP: `POST /v1/moderate`. Python: `serve.get_app_handle("moderation").moderate.remote({...})`.
"""

from fastapi import Request, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from monitoring.batching import unwrap
from serve_apps import metrics
from serve_apps.batch import Item
from serve_apps.breaker import CircuitBreaker
from serve_apps.call import Answer, Call, Caller, Decided
from serve_apps.config import ModerationAppConfig
from serve_apps.http import (
    Envelope,
    StageModel,
    TextsRequest,
    check_label,
    create_app,
)
from serve_apps.inference_log import generated
from serve_apps.pii import redact
from serve_apps.pipeline import TextsPipeline


class Moderation(BaseModel):
    verdict: str
    flagged: bool
    action: str = Field(description="allow, rewrite, block, redact, or hold: held for a person "
                        "to review (not shown) when the classifier was unsure between labels "
                        "that call for different actions")
    confidence: float
    abstained: bool = Field(False, description="the classifier's conformal prediction set was "
                            "not exactly one label")
    candidates: list[str] | None = Field(None, description="that prediction set, when "
                                         "abstention is on")
    scores: dict[str, float]
    safe_text: str | None = Field(description="what may be shown; null when blocked")
    redactions: dict[str, int]
    models: dict[str, StageModel]


class ModerateResponse(Envelope):
    results: list[Moderation]


app = create_app("llmops moderation", "Classify posts; rewrite toxic ones; redact personal data.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class ModerationPipeline(TextsPipeline):
    application, settings = "moderation", ModerationAppConfig
    method = scope = "moderate"
    moderate = TextsPipeline.answer  # the handle method

    def __init__(self, classifier: DeploymentHandle | None, generator: DeploymentHandle | None,
                 config: dict, limits: dict, tracking_uri: str | None, log: dict | None = None,
                 governance: dict | None = None):
        super().__init__(app, {"Classifier": classifier, "Generator": generator}, config,
                         limits, tracking_uri, log, governance)
        self.generator = self.stages["Generator"]
        self.breaker = CircuitBreaker(self.config.breaker)
        self.batch_classifier(self._classify)

    @app.post("/", response_model=ModerateResponse)
    async def http_moderate(self, body: TextsRequest, request: Request,
                            response: Response) -> ModerateResponse:
        return await self.answer_as(body, Caller.http(request), response)

    def respond(self, call: Call, answer: Answer) -> ModerateResponse:
        results = [r.model_copy(update={"safe_text": out})
                   for r, out in zip(answer.payload, answer.outputs)]
        return ModerateResponse(results=results, **call.summary(answer.degraded,
                                                                answer.served_by))

    async def decide(self, item: Item) -> Decided:
        verdict = check_label(unwrap(await self._classify(item)))
        result, tokens, degraded, rewrite = await self._finish(item.text, verdict,
                                                               item.request_id, item.fallback)
        metrics.guardrail_action(result.action)
        logged = verdict if rewrite is None else {**verdict, "generated": generated(item.text,
                                                                                   rewrite)}
        return Decided(result, logged, result.safe_text, tokens, degraded)

    async def _rewrite(self, text: str, rid: str, peak: bool) -> dict | None:
        """The generator's safe version of `text` (at a peak by its student, where it has one;
        with its prompt's embedding: the rewrite is logged as the generator's answer, for its
        drift checks and its reviewers' corrections); None when it failed or its breaker is
        open (the post is then hidden: never shown unrewritten)."""
        try:
            return await self.breaker.call(
                lambda: self.generator.generate.remote(text, rid, embed=True, fallback=peak))
        except Exception as exc:
            metrics.degraded(type(exc).__name__)
            return None

    async def _finish(self, text: str, verdict: dict, rid: str, peak: bool
                      ) -> tuple[Moderation, int, bool, dict | None]:
        """The result of one text, the tokens its rewrite used, whether a fallback answered
        (at a peak a post to rewrite may be hidden unrewritten: `skip_generation`), and the
        generator's answer if it was rewritten."""
        label, candidates = verdict["label"], verdict.get("candidates")
        models = {"classifier": StageModel(**verdict["model"])}
        if "shadow" in verdict:  # the challenger's answer is recorded, never returned as text
            models["classifier_shadow"] = StageModel(**verdict["shadow"]["model"])
        tokens, degraded, rewrite = 0, False, None
        abstained = verdict.get("abstained", False)
        if abstained:
            metrics.abstained(verdict["model"])
        if abstained and len({self._acts(c) for c in candidates}) != 1:
            action, safe = "hold", None
        elif label in self.config.block_labels:
            action, safe = "block", None
        elif label in self.config.rewrite_labels:
            rewrite = None if self.skip_generation(peak) else await self._rewrite(text, rid,
                                                                                 peak)
            if rewrite is None:
                action, safe, degraded = "block", None, True
            else:
                action, safe = "rewrite", rewrite["text"]
                models["generator"] = StageModel(**rewrite["model"])
                tokens = rewrite["prompt_tokens"] + rewrite["completion_tokens"]
        else:
            action, safe = "allow", text
        found: dict[str, int] = {}
        if safe is not None:
            redaction = redact(safe)
            safe, found = redaction.text, redaction.found
            if action == "allow" and (found or label in self.config.redact_labels):
                action = "redact"
        return (Moderation(verdict=label, flagged=label != "safe" or action == "hold",
                           action=action, confidence=verdict["confidence"],
                           scores=verdict["scores"], abstained=abstained, candidates=candidates,
                           safe_text=safe, redactions=found, models=models), tokens, degraded,
                rewrite)

    def _acts(self, label: str) -> str:
        """What a label calls for: block, rewrite, or show (redacted where needed)."""
        return ("block" if label in self.config.block_labels else
                "rewrite" if label in self.config.rewrite_labels else "show")
