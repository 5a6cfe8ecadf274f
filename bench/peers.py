"""What `bench/serve.py` measures the platform against, all serving the same trained models with
the same batch size: the pipelines' model calls in-process (the limit), a naive FastAPI server
(one request per forward pass), a no-op Ray Serve deployment (Serve's own floor: proxy and one
hop) and a plain Ray Serve application with `@serve.batch` and none of the platform's features
(the floor Ray itself sets for these models)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import PIPELINES  # noqa: E402

from serve_apps.config import ServeConfig  # noqa: E402
from serve_apps.model_config import GenerationConfig

# the peers' replicas unpickle their classes from this module (and `stack`), by name
IMPORTABLE = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}}
# the BentoML peer's environment (`make bench-env`)
BENTOML = Path(__file__).resolve().parents[1] / ".venv-bento" / "bin" / "bentoml"


def run_pipeline(name: str, models: dict, texts: list[str], cfg: ServeConfig) -> list[dict]:
    """What a pipeline computes for `texts`, called directly: its answer per text (queue or
    verdict, and the reply or rewrite where the pipeline makes one)."""
    if name == "support":
        routed = models["router"].classify(texts)
        g = cfg.support.generator.generation
        replies = models["replier"].generate(texts, g.max_new_tokens, g.temperature, g.seed, g.stop)
        unsure = [t for t, r in zip(texts, replies)
                  if r["confidence"] < cfg.support.min_reply_confidence]
        if unsure:
            models["encoder"].embed(unsure)
        return [{"queue": r["label"], "reply": p["text"]} for r, p in zip(routed, replies)]
    verdicts = models["moderation"].classify(texts)
    flagged = [i for i, v in enumerate(verdicts) if v["label"] in cfg.moderation.rewrite_labels]
    out = [{"verdict": v["label"]} for v in verdicts]
    if flagged:
        g = cfg.moderation.generator.generation or GenerationConfig()
        rewrites = models["rewriter"].generate([texts[i] for i in flagged], g.max_new_tokens,
                                               g.temperature, g.seed, g.stop)
        for i, r in zip(flagged, rewrites):
            out[i]["rewrite"] = r["text"]
    return out


def served_models(cfg: ServeConfig) -> dict:
    return {"router": cfg.support.classifier, "encoder": cfg.support.encoder,
            "replier": cfg.support.generator, "moderation": cfg.moderation.classifier,
            "rewriter": cfg.moderation.generator}


def load_models(cfg: ServeConfig, tracking_uri: str, precision: bool) -> dict:
    """The served models; in their served precision, or fp32 (the naive baseline)."""
    from serve_apps.model import load

    return {k: load(md.model, tracking_uri, md.precision if precision else "fp32")
            for k, md in served_models(cfg).items()}


def naive_app(tracking_uri: str, cfg: ServeConfig):
    """The baseline: FastAPI + transformers (fp32, as loaded), one request per forward pass,
    no batching."""
    from fastapi import FastAPI

    models = load_models(cfg, tracking_uri, precision=False)
    app = FastAPI()

    def endpoint(name: str):
        def call(body: dict) -> dict:  # plain def: FastAPI runs it in its thread pool
            return run_pipeline(name, models, [body["text"]], cfg)[0]
        return call

    for name, (_, path, _) in PIPELINES.items():
        app.post(path)(endpoint(name))
    return app


def naive_server(port: int, tracking_uri: str, cfg: ServeConfig) -> None:
    import uvicorn

    uvicorn.run(naive_app(tracking_uri, cfg), host="127.0.0.1", port=port, log_level="error")


def noop_app(cpus: float = 0.1):
    """Serve's floor: the proxy and one replica that reads the body and answers `{}`."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": cpus, "runtime_env": IMPORTABLE},
                      max_ongoing_requests=256)
    class NoOp:
        async def __call__(self, request) -> dict:
            await request.json()
            return {}

    return NoOp.bind()


def plain_serve_app(tracking_uri: str, cfg: ServeConfig, batch: int, cpus: float = 0.1):
    """Both pipelines in one plain Serve replica: the same models in their served precision,
    concurrent requests batched by `@serve.batch` (as the platform's first stage is), no
    policies, guardrails, log or hops."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": cpus, "runtime_env": IMPORTABLE},
                      max_ongoing_requests=256)
    class PlainPipelines:
        def __init__(self):
            self.models = load_models(cfg, tracking_uri, precision=True)
            self.paths = {path: name for name, (_, path, _) in PIPELINES.items()}

        async def _run(self, name: str, texts: list[str]) -> list[dict]:
            return await asyncio.to_thread(run_pipeline, name, self.models, texts, cfg)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.01)
        async def support(self, texts: list[str]) -> list[dict]:
            return await self._run("support", texts)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.01)
        async def moderation(self, texts: list[str]) -> list[dict]:
            return await self._run("moderation", texts)

        async def __call__(self, request) -> dict:
            path = request.url.path.rstrip("/")  # under any route prefix
            name = next(n for p, n in self.paths.items() if path.endswith(p))
            return await getattr(self, name)((await request.json())["text"])

    return PlainPipelines.bind()


@contextlib.contextmanager
def bentoml_server(port: int, tracking_uri: str, cfg: ServeConfig, timeout: float = 300):
    """`bench/bento_peer.py` served by BentoML from its own environment, until it answers;
    yields (base URL, the pids of its process tree)."""
    import httpx
    import psutil

    env = {**os.environ, "LLMOPS_BENCH_TRACKING_URI": tracking_uri,
           "LLMOPS_BENCH_SERVE_CONFIG": cfg.model_dump_json(), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen([str(BENTOML), "serve", "bento_peer:Pipelines", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=Path(__file__).parent,
                            env=env, stdout=sys.stderr)  # its access log: not the JSON report
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{base}/readyz", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the BentoML peer never got ready (exit {proc.poll()})") from None
                time.sleep(1)
        yield base, [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    finally:
        proc.terminate()
        proc.wait()
