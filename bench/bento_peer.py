"""The BentoML peer of `bench/serve.py`: both pipelines' models in one BentoML service, each
endpoint batched by BentoML's adaptive batching with the platform's maximum batch size, none of
the platform's features. BentoML pins another OpenTelemetry than Ray and MLflow, so it runs from
an environment of its own that sees the platform's packages behind its own (`make bench-env`);
`bench/serve.py` starts it as

    .venv-bento/bin/bentoml serve bento_peer:Pipelines --port PORT   (in bench/)

with the registry and the serving settings in LLMOPS_BENCH_TRACKING_URI and
LLMOPS_BENCH_SERVE_CONFIG. A client sends `{"texts": [text]}` and gets a one-element list."""

from __future__ import annotations

import os

import bentoml
from peers import load_models, run_pipeline
from stack import PIPELINES

from serve_apps.config import ServeConfig

CFG = ServeConfig.model_validate_json(os.environ.get("LLMOPS_BENCH_SERVE_CONFIG", "{}"))
BATCH = CFG.support.classifier.batching.max_batch_size
# BentoML answers 503 when it expects a batch to miss this: far above any closed-loop latency
# here, so that it batches and never sheds (as the other peers never shed)
LATENCY_MS = 120_000


@bentoml.service(workers=1, traffic={"timeout": 120})
class Pipelines:
    def __init__(self) -> None:
        self.models = load_models(CFG, os.environ["LLMOPS_BENCH_TRACKING_URI"], precision=True)

    @bentoml.api(route=PIPELINES["support"][1], batchable=True, max_batch_size=BATCH,
                 max_latency_ms=LATENCY_MS)
    def support(self, texts: list[str]) -> list[dict]:
        return run_pipeline("support", self.models, texts, CFG)

    @bentoml.api(route=PIPELINES["moderation"][1], batchable=True, max_batch_size=BATCH,
                 max_latency_ms=LATENCY_MS)
    def moderation(self, texts: list[str]) -> list[dict]:
        return run_pipeline("moderation", self.models, texts, CFG)
