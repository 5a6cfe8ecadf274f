"""Serving throughput and latency of the `support` and `moderation` pipelines on Ray Serve, over
HTTP and over handles, against (a) the same model forward passes called in-process with the same
batch size (the limit) and (b) a naive FastAPI + transformers server that runs each request
alone (the baseline), all in one run.

    python bench/serve.py --json [--duration 8] [--concurrency 1 8 32] [--data-dir DIR]

Models: the configured architectures (MiniLM router and moderation heads, the GPT-2-style
rewriter), registered untrained in a scratch registry unless `--data-dir` names one holding
trained champions: speed does not depend on the weights, but moderation's cost does depend on how
many posts get flagged and rewritten, so the report says which models ran. Clients are closed
loops: `concurrency` workers each send a request as soon as the previous one returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import runtime  # noqa: E402
from cluster.settings import load_settings  # noqa: E402
from serve_apps.config import ServeConfig  # noqa: E402
from training.data import generate  # noqa: E402

PIPELINES = {"support": ("support-tickets", "/v1/support/route", "route"),
             "moderation": ("moderation", "/v1/moderate", "moderate")}


def register_untrained(settings, registry) -> None:
    """Every task's configured architecture, untrained, as `@champion` (speed only)."""
    import torch

    from training.job import build_task_data, make_spec, register_model_dir
    from training.models import build_model

    torch.manual_seed(0)  # the same untrained weights, so the same share of posts gets rewritten
    for task in ("support-router", "moderation", "rewriter"):
        tc = settings.training.tasks[task]
        settings.training.tasks[task] = tc.model_copy(update={"holdouts": ["base"],
                                                              "holdout_size": 16})
        data = build_task_data(settings.training, task)
        spec = make_spec(settings.training, registry, task, data)
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{task}-"))
        build_model(spec.model, spec.kind, spec.labels, spec.tokenizer).save_pretrained(folder)
        spec.tokenizer.save_pretrained(folder)
        register_model_dir(settings.training, registry, task, data, folder, spec.labels,
                           history=[], ds_config={}, started=time.perf_counter())


def summarize(latencies: list[float], seconds: float, items: int, failed: int) -> dict:
    lat = np.array(latencies) * 1000
    return {"rps": round(items / seconds, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "requests": items,
            "failed": failed}


async def closed_loop(call, texts: list[str], concurrency: int, duration: float) -> dict:
    """`concurrency` workers calling `call(text)` back to back for `duration` seconds."""
    latencies: list[float] = []
    failed = 0
    deadline = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                await call(texts[i % len(texts)])
                latencies.append(time.perf_counter() - started)
            except Exception:
                failed += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return summarize(latencies, time.perf_counter() - started, len(latencies), failed)


def http_call(client, url: str):
    async def call(text: str) -> None:
        r = await client.post(url, json={"text": text})
        r.raise_for_status()
    return call


def limit(pipeline: str, models: dict, texts: list[str], batch: int, duration: float) -> dict:
    """The same stages called in-process on batches of `batch` texts: no queues, no hops."""
    started, done, latencies = time.perf_counter(), 0, []
    while time.perf_counter() - started < duration:
        chunk = [texts[(done + j) % len(texts)] for j in range(batch)]
        t = time.perf_counter()
        if pipeline == "support":
            models["router"].classify(chunk)
            models["encoder"].embed(chunk)
        else:
            verdicts = models["moderation"].classify(chunk)
            flagged = [x for x, v in zip(chunk, verdicts) if v["label"] == "toxic"]
            if flagged:
                models["rewriter"].generate(flagged, 48, 0.0, 0, ["\n"])
        latencies.append(time.perf_counter() - t)
        done += batch
    return {**summarize(latencies, time.perf_counter() - started, done, 0), "batch_size": batch}


def naive_server(port: int, tracking_uri: str) -> None:
    """The baseline: FastAPI + transformers (fp32, as loaded), one request per forward pass,
    no batching."""
    import uvicorn
    from fastapi import FastAPI

    from serve_apps.model import load

    m = {"router": load("models:/support-router@champion", tracking_uri),
         "encoder": load("all-MiniLM-L6-v2", tracking_uri),
         "moderation": load("models:/moderation@champion", tracking_uri),
         "rewriter": load("models:/rewriter@champion", tracking_uri)}
    app = FastAPI()

    @app.post("/v1/support/route")
    def route(body: dict) -> dict:
        out = m["router"].classify([body["text"]])[0]
        m["encoder"].embed([body["text"]])
        return out

    @app.post("/v1/moderate")
    def moderate(body: dict) -> dict:
        out = m["moderation"].classify([body["text"]])[0]
        if out["label"] == "toxic":
            out = m["rewriter"].generate([body["text"]], 48, 0.0, 0, ["\n"])[0]
        return out

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


async def measure_http(base: str, concurrencies: list[int], duration: float, texts: dict) -> dict:
    import httpx

    out = {}
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for name, (_, path, _) in PIPELINES.items():
            call = http_call(client, base + path)
            await closed_loop(call, texts[name], 4, 1.0)  # warm-up
            out[name] = {f"c{c}": await closed_loop(call, texts[name], c, duration)
                         for c in concurrencies}
    return out


async def measure_handles(concurrencies: list[int], duration: float, texts: dict) -> dict:
    from ray import serve

    out = {}
    for name, (_, _, method) in PIPELINES.items():
        handle = getattr(serve.get_app_handle(name), method)

        async def call(text: str) -> None:
            await handle.remote({"text": text})  # noqa: B023

        await closed_loop(call, texts[name], 4, 1.0)
        out[name] = {f"c{c}": await closed_loop(call, texts[name], c, duration)
                     for c in concurrencies}
    return out


def _wait_http(url: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.post(url, json={"text": "hello"}, timeout=30)
            return
        except httpx.HTTPError:
            time.sleep(1)
    raise RuntimeError(f"{url} never answered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--data-dir", help="a data dir with trained champions (default: scratch)")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--precision", choices=["auto", "fp32", "int8"],
                        help="override every served model's precision (default: settings)")
    parser.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runtime.apply_platform_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.naive_server:
        return naive_server(args.naive_server, args.tracking_uri)

    import ray
    import torch

    from serve_apps.deploy import ServeCluster, serve_config
    from serve_apps.model import load
    from training.registry import Registry

    settings = load_settings(overrides={"data_dir": args.data_dir or tempfile.mkdtemp()})
    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    trained = bool(args.data_dir)
    if not trained:
        register_untrained(settings, registry)
    texts = {name: list(generate(ds, "base", 256, seed=11).text)
             for name, (ds, _, _) in PIPELINES.items()}
    cfg = settings.serve.model_dump()
    cfg.update(port=args.port, use_gpu="no", chat={"enabled": False})
    if args.precision:
        for app, deps in (("support", ("classifier", "encoder")),
                          ("moderation", ("classifier", "generator"))):
            for dep in deps:
                cfg[app][dep]["precision"] = args.precision
    serve_cfg = ServeConfig.model_validate(cfg)
    batch = serve_cfg.support.classifier.batching.max_batch_size

    # (a) the in-process limit: the served models (same precision), all cores, same batch size
    torch.set_num_threads(os.cpu_count())
    served = {"router": serve_cfg.support.classifier, "encoder": serve_cfg.support.encoder,
              "moderation": serve_cfg.moderation.classifier,
              "rewriter": serve_cfg.moderation.generator}
    models = {k: load(md.model, registry.tracking_uri, md.precision) for k, md in served.items()}
    limits = {name: limit(name, models, texts[name], batch, args.duration) for name in PIPELINES}
    del models

    # (b) the naive baseline in its own process
    naive_port = args.port + 1
    naive = subprocess.Popen([sys.executable, __file__, "--naive-server", str(naive_port),
                              "--tracking-uri", registry.tracking_uri])
    try:
        _wait_http(f"http://127.0.0.1:{naive_port}/v1/support/route")
        baseline = asyncio.run(measure_http(f"http://127.0.0.1:{naive_port}", args.concurrency,
                                            args.duration, texts))
    finally:
        naive.terminate()
        naive.wait()

    # Ray Serve, deployed from the same settings as `llmops up`
    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                   log_to_driver=False, runtime_env={"env_vars": dict(runtime.PLATFORM_ENV)})
    cluster = ServeCluster(ctx.dashboard_url)
    cluster.deploy(serve_config(serve_cfg, registry.tracking_uri, False,
                                dict(runtime.PLATFORM_ENV)), timeout_s=600)
    http = asyncio.run(measure_http(f"http://127.0.0.1:{args.port}", args.concurrency,
                                    args.duration, texts))
    handles = asyncio.run(measure_handles(args.concurrency, args.duration, texts))
    cluster.shutdown()
    ray.shutdown()

    report = {"benchmark": "serve_pipelines", "cpus": os.cpu_count(), "batch_size": batch,
              "models": "trained champions" if trained else "configured architectures, untrained",
              "precision": {k: md.precision for k, md in served.items()},
              "duration_s": args.duration, "in_process_limit": limits,
              "naive_fastapi_baseline": baseline, "serve_http": http, "serve_handle": handles,
              "ratios": {}}
    top = f"c{max(args.concurrency)}"
    for name in PIPELINES:
        for path, results in (("handle", handles), ("http", http)):
            rps = results[name][top]["rps"]
            report["ratios"][f"{name}_{path}_{top}"] = {
                "vs_in_process_limit": round(rps / limits[name]["rps"], 3),
                "vs_naive_baseline": round(rps / baseline[name][top]["rps"], 3)}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
