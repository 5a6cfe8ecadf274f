"""The `support` application: route a ticket to a queue with the router's confidence, and
suggest a reply. The reply generator (`support-reply`) answers first; when it is not confident
(`min_reply_confidence`), the suggestion is the reply that resolved the closest earlier ticket
instead (nearest neighbour by sentence embedding among resolved tickets of the router's own
training data), so a ticket unlike anything seen in training gets a real agent's reply, not a
guess. Router and generator run side by side; the encoder only for the unsure ones. The log
holds both answers of a ticket: the router's (it takes a label) and the reply generator's,
suggested or not (it takes a correction).

HTTP: `POST /v1/support/route`. Python: `serve.get_app_handle("support").route.remote({...})`.
"""

import asyncio
from dataclasses import replace
from typing import Literal

import numpy as np
import pandas as pd
from fastapi import Request, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from monitoring.batching import unwrap
from serve_apps import metrics
from serve_apps.batch import Item
from serve_apps.breaker import CircuitBreaker
from serve_apps.call import Answer, Call, Caller, Decided
from serve_apps.config import SupportAppConfig
from serve_apps.http import (
    Envelope,
    StageModel,
    TextsRequest,
    check_label,
    create_app,
)
from serve_apps.inference_log import generated
from serve_apps.pipeline import TextsPipeline
from training.data.support import RESOLUTIONS


class Suggestion(BaseModel):
    reply: str
    source: Literal["generator", "retrieval"]
    confidence: float = Field(description="the generator's confidence in its own reply: the "
                              "probability of its least likely token")
    intent: str | None = Field(None, description="retrieval: the closest resolved ticket's intent")
    similarity: float | None = Field(None, description="retrieval: cosine similarity to it")
    example: str | None = Field(None, description="retrieval: that ticket's text")


class Routing(BaseModel):
    queue: str = Field(description="where the ticket goes: the router's label, or the review "
                       "queue when it abstained")
    label: str = Field(description="the router's most likely queue")
    confidence: float
    scores: dict[str, float]
    abstained: bool = Field(False, description="the router's conformal prediction set was not "
                            "exactly one queue")
    candidates: list[str] | None = Field(None, description="that prediction set, when "
                                         "abstention is on")
    suggestion: Suggestion
    models: dict[str, StageModel]


class RouteResponse(Envelope):
    results: list[Routing]


def resolved_examples(tracking_uri: str, name: str, version: str, per_intent: int,
                      seed: int = 0) -> pd.DataFrame:
    """Up to `per_intent` base-scenario tickets per intent from the data the router version was
    trained on (the `data/reference.parquet` of its MLflow run)."""
    from training.registry import REFERENCE_FILE, Registry

    df = Registry.at(tracking_uri).run_data(name, version, REFERENCE_FILE)
    df = df[df.intent.isin(RESOLUTIONS) & (df.scenario == "base")]
    return (df.sample(frac=1.0, random_state=seed).groupby("intent").head(per_intent)
            .reset_index(drop=True))


app = create_app("llmops support", "Route support tickets to a queue and suggest a reply.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class SupportPipeline(TextsPipeline):
    application, settings = "support", SupportAppConfig
    method, scope = "route", "support"
    route = TextsPipeline.answer  # the handle method

    def __init__(self, classifier: DeploymentHandle | None, encoder: DeploymentHandle | None,
                 generator: DeploymentHandle | None, config: dict, limits: dict,
                 tracking_uri: str | None, log: dict | None = None,
                 governance: dict | None = None):
        super().__init__(app, {"Classifier": classifier, "Encoder": encoder,
                               "Generator": generator}, config, limits, tracking_uri, log,
                         governance)
        self.classifier, self.encoder, self.generator = (
            self.stages["Classifier"], self.stages["Encoder"], self.stages["Generator"])
        self.breaker = CircuitBreaker(self.config.breaker)
        self.batch_classifier(self.decide)
        self._examples: pd.DataFrame | None = None
        self._matrix: np.ndarray | None = None
        self._lock = asyncio.Lock()

    @app.post("/route", response_model=RouteResponse)
    async def http_route(self, body: TextsRequest, request: Request,
                         response: Response) -> RouteResponse:
        return await self.answer_as(body, Caller.http(request), response)

    def respond(self, call: Call, answer: Answer) -> RouteResponse:
        results = [r.model_copy(update={"suggestion": r.suggestion.model_copy(
            update={"reply": out})}) for r, out in zip(answer.payload, answer.outputs)]
        return RouteResponse(results=results, **call.summary(answer.degraded, answer.served_by))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def decide(self, items: list[Item]) -> list[Decided | Exception]:
        """Texts of concurrent requests go to each model in one call, not one call each. The
        reply is retrieved when the generator is unsure, fails or its breaker is open, or
        skipped at a peak (`skip_generation`)."""
        asked = [i for i, it in enumerate(items) if not self.skip_generation(it.fallback)]
        routes, generated = await asyncio.gather(self.classifier.predict_many.remote(items),
                                                 self._replies([items[i] for i in asked]))
        replies = [None] * len(items)
        for i, reply in zip(asked, generated):
            replies[i] = reply
        unsure = [i for i, r in enumerate(replies)
                  if r is None or r["confidence"] < self.config.min_reply_confidence]
        retrieved = dict(zip(unsure, await self._retrieve([items[i] for i in unsure])))
        return [self._decided(item.text, route, reply, retrieved.get(i))
                for i, (item, route, reply) in enumerate(zip(items, routes, replies))]

    def _decided(self, text: str, route: dict | Exception, reply: dict | None,
                 retrieved: dict | Exception | None) -> Decided | Exception:
        """One item's decision, or the exception that failed that item alone (its caller raises
        it; the other items of the batch are answered). The generator's reply is logged as its
        answer whether or not it was the suggestion (an unsure reply is the one most worth a
        reviewer's correction)."""
        try:
            route = check_label(unwrap(route))
            result = self._result(route, reply, unwrap(retrieved))
            logged = route if reply is None else {**route, "generated": generated(text, reply)}
            return Decided(result, logged, result.suggestion.reply,
                           reply["prompt_tokens"] + reply["completion_tokens"] if reply else 0,
                           degraded="generator" not in result.models)
        except Exception as exc:
            return exc

    async def _replies(self, items: list[Item]) -> list[dict | None]:
        """The generator's replies, with their prompts' embeddings (the reply generator's drift
        checks compare them); Nones when it failed or its breaker is open."""
        if not items:
            return []
        asked = [replace(it, embed=True) for it in items]
        try:
            replies = await self.breaker.call(lambda: self.generator.generate_many.remote(asked))
        except Exception as exc:
            metrics.degraded(type(exc).__name__)
            return [None] * len(items)
        for reply in replies:
            if isinstance(reply, Exception):
                metrics.degraded(type(reply).__name__)
        return [None if isinstance(r, Exception) else r for r in replies]

    async def _retrieve(self, items: list[Item]) -> list[dict | Exception]:
        """The closest resolved ticket's reply for each item, and the encoder that found it."""
        if not items:
            return []
        await self._build_index()
        found: list[dict | Exception] = []
        for embedding in await self.encoder.predict_many.remote(items):
            if isinstance(embedding, Exception):
                found.append(embedding)
                continue
            sims = self._matrix @ embedding["embedding"]
            best = int(sims.argmax())
            row = self._examples.iloc[best]
            found.append({"reply": RESOLUTIONS[row.intent], "intent": row.intent,
                          "similarity": round(float(sims[best]), 4), "example": row.text,
                          "model": embedding["model"]})
        return found

    def _result(self, route: dict, reply: dict | None, retrieved: dict | None) -> Routing:
        models = {"router": StageModel(**route["model"])}
        if reply is not None:
            models["generator"] = StageModel(**reply["model"])
        if retrieved is None:
            suggestion = Suggestion(reply=reply["text"], source="generator",
                                    confidence=reply["confidence"])
        else:
            models["encoder"] = StageModel(**retrieved.pop("model"))
            suggestion = Suggestion(source="retrieval", confidence=reply["confidence"] if reply
                                    else 0.0, **retrieved)
        abstained = route.get("abstained", False)
        if abstained:
            metrics.abstained(route["model"])
        return Routing(queue=self.config.review_queue if abstained else route["label"],
                       label=route["label"], confidence=route["confidence"],
                       scores=route["scores"], abstained=abstained,
                       candidates=route.get("candidates"),
                       suggestion=suggestion, models=models)

    async def _build_index(self) -> None:
        """Embed the resolved tickets once, on first use (not in the constructor, so replicas
        start fast and a registry hiccup fails a request, not the deployment)."""
        if self._matrix is not None:
            return
        async with self._lock:
            if self._matrix is not None:
                return
            router = (await self.classifier.identity.remote())["champion"]
            examples = await asyncio.to_thread(resolved_examples, self.tracking_uri,
                                               router["name"], router["version"],
                                               self.config.examples_per_intent)
            vectors = await asyncio.gather(*(self.encoder.predict.remote(Item(t, "index"))
                                             for t in examples.text))
            self._examples = examples
            self._matrix = np.stack([v["embedding"] for v in vectors])
