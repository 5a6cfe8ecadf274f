"""The `support` application: route a ticket to a queue with the router's confidence, and
suggest the reply that resolved the closest earlier ticket (nearest neighbour by sentence
embedding among resolved tickets of the router's own training data).

HTTP: `POST /v1/support/route`. Python: `serve.get_app_handle("support").route.remote({...})`.
"""

import asyncio

import numpy as np
import pandas as pd
from fastapi import Request
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_apps.config import LimitsConfig, SupportAppConfig
from serve_apps.deployments import Item, set_batching
from serve_apps.http import StageModel, TextsRequest, create_app, new_request_id, request_texts
from training.data.support import RESOLUTIONS


class Suggestion(BaseModel):
    reply: str
    intent: str = Field(description="the intent of the closest resolved ticket")
    similarity: float = Field(description="cosine similarity to that ticket")
    example: str


class Routing(BaseModel):
    queue: str
    confidence: float
    scores: dict[str, float]
    suggestion: Suggestion
    models: dict[str, StageModel]


class RouteResponse(BaseModel):
    request_id: str
    results: list[Routing]


def resolved_examples(tracking_uri: str | None, name: str, version: str, per_intent: int,
                      seed: int = 0) -> pd.DataFrame:
    """Up to `per_intent` base-scenario tickets per intent from the data the router version was
    trained on (the `data/reference.parquet` of its MLflow run)."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/reference.parquet",
                                               tracking_uri=tracking_uri)
    df = pd.read_parquet(path)
    df = df[df.intent.isin(RESOLUTIONS) & (df.scenario == "base")]
    return (df.sample(frac=1.0, random_state=seed).groupby("intent").head(per_intent)
            .reset_index(drop=True))


app = create_app("llmops support", "Route support tickets to a queue and suggest a reply.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class SupportPipeline:
    def __init__(self, classifier: DeploymentHandle, encoder: DeploymentHandle, config: dict,
                 limits: dict, tracking_uri: str | None):
        self.classifier, self.encoder = classifier, encoder
        self.config = SupportAppConfig.model_validate(config)
        self.limits = LimitsConfig.model_validate(limits)
        self.tracking_uri = tracking_uri
        set_batching(self._route_and_embed, **self.config.classifier.batching.model_dump())
        self._examples: pd.DataFrame | None = None
        self._matrix: np.ndarray | None = None
        self._lock = asyncio.Lock()

    @app.post("/route", response_model=RouteResponse)
    async def http_route(self, body: TextsRequest, request: Request) -> RouteResponse:
        return await self.route(body, request.state.request_id)

    async def route(self, request: TextsRequest | dict,
                    request_id: str | None = None) -> RouteResponse:
        """Route every text of the request; the same for HTTP and handle callers."""
        texts = request_texts(request, self.limits)
        rid = new_request_id(request_id)
        await self._build_index()
        pairs = await asyncio.gather(*(self._route_and_embed(Item(t, rid)) for t in texts))
        return RouteResponse(request_id=rid, results=[self._result(r, e) for r, e in pairs])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _route_and_embed(self, items: list[Item]) -> list[tuple[dict, dict]]:
        """Texts of concurrent requests go to each model in one call, not one call each."""
        routes, embeddings = await asyncio.gather(self.classifier.predict_many.remote(items),
                                                  self.encoder.predict_many.remote(items))
        return list(zip(routes, embeddings))

    def _result(self, route: dict, embedding: dict) -> Routing:
        sims = self._matrix @ embedding["embedding"]
        best = int(sims.argmax())
        row = self._examples.iloc[best]
        return Routing(
            queue=route["label"], confidence=route["confidence"], scores=route["scores"],
            suggestion=Suggestion(reply=RESOLUTIONS[row.intent], intent=row.intent,
                                  similarity=round(float(sims[best]), 4), example=row.text),
            models={"router": StageModel(**route["model"]),
                    "encoder": StageModel(**embedding["model"])})

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

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}
