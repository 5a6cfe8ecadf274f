"""Serving throughput and latency of the `support` and `moderation` pipelines on Ray Serve, over
HTTP and over handles, against (a) the same model forward passes called in-process with the same
batch size (the limit) and (b) a naive FastAPI + transformers server that runs each request
alone (the baseline), all in one run.

    python bench/serve.py --json [--duration 8] [--concurrency 1 8 32] [--data-dir DIR]

Models: the configured architectures (MiniLM router and moderation heads, the GPT-2-style
rewriter and reply generator), registered untrained in a scratch registry unless `--data-dir`
names one holding trained champions. Speed does not depend on the weights, but the pipelines'
cost does depend on how many posts get rewritten and how many tickets fall back to retrieval,
so the report says which models ran (use trained ones for figures). Clients are closed loops:
`concurrency` workers each send a request as soon as the previous one returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import PIPELINES, models_of, platform, sample_texts, start_ray  # noqa: E402

from cluster import runtime  # noqa: E402
from serve_apps.config import GenerationConfig, ServeConfig  # noqa: E402


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


def run_pipeline(name: str, models: dict, texts: list[str], cfg: ServeConfig) -> None:
    """What a pipeline computes for `texts`, called directly (no Serve): the limit runs it on
    whole batches, the naive baseline on one text per request."""
    if name == "support":
        models["router"].classify(texts)
        g = cfg.support.generator.generation
        replies = models["replier"].generate(texts, g.max_new_tokens, g.temperature, g.seed, g.stop)
        unsure = [t for t, r in zip(texts, replies)
                  if r["confidence"] < cfg.support.min_reply_confidence]
        if unsure:
            models["encoder"].embed(unsure)
    else:
        verdicts = models["moderation"].classify(texts)
        flagged = [t for t, v in zip(texts, verdicts) if v["label"] in cfg.moderation.rewrite_labels]
        if flagged:
            g = cfg.moderation.generator.generation or GenerationConfig()
            models["rewriter"].generate(flagged, g.max_new_tokens, g.temperature, g.seed, g.stop)


def served_models(cfg: ServeConfig) -> dict:
    return {"router": cfg.support.classifier, "encoder": cfg.support.encoder,
            "replier": cfg.support.generator, "moderation": cfg.moderation.classifier,
            "rewriter": cfg.moderation.generator}


def load_models(cfg: ServeConfig, tracking_uri: str, precision: bool) -> dict:
    """The served models; in their served precision, or fp32 (the naive baseline)."""
    from serve_apps.model import load

    return {k: load(md.model, tracking_uri, md.precision if precision else "fp32")
            for k, md in served_models(cfg).items()}


def limit(name: str, models: dict, texts: list[str], cfg: ServeConfig, batch: int,
          duration: float) -> dict:
    """The pipeline called in-process on batches of `batch` texts: no queues, no hops."""
    started, done, latencies = time.perf_counter(), 0, []
    while time.perf_counter() - started < duration:
        t = time.perf_counter()
        run_pipeline(name, models, [texts[(done + j) % len(texts)] for j in range(batch)], cfg)
        latencies.append(time.perf_counter() - t)
        done += batch
    return {**summarize(latencies, time.perf_counter() - started, done, 0), "batch_size": batch}


def naive_server(port: int, tracking_uri: str, cfg: ServeConfig) -> None:
    """The baseline: FastAPI + transformers (fp32, as loaded), one request per forward pass,
    no batching."""
    import uvicorn
    from fastapi import FastAPI

    models = load_models(cfg, tracking_uri, precision=False)
    app = FastAPI()

    def endpoint(name: str):
        def call(body: dict) -> None:  # plain def: FastAPI runs it in its thread pool
            run_pipeline(name, models, [body["text"]], cfg)
        return call

    for name, (_, path, _) in PIPELINES.items():
        app.post(path)(endpoint(name))
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
    parser.add_argument("--serve-config", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runtime.apply_platform_env()
    if args.naive_server:
        return naive_server(args.naive_server, args.tracking_uri,
                            ServeConfig.model_validate_json(args.serve_config))

    import ray
    import torch

    from serve_apps.deploy import serve_config

    settings, registry = platform(args.data_dir)
    texts = sample_texts(11)
    cfg = settings.serve.model_dump()
    cfg.update(port=args.port, use_gpu="no", chat={"enabled": False})
    if args.precision:
        for app, deps in (("support", ("classifier", "encoder", "generator")),
                          ("moderation", ("classifier", "generator"))):
            for dep in deps:
                cfg[app][dep]["precision"] = args.precision
    serve_cfg = ServeConfig.model_validate(cfg)
    batch = serve_cfg.support.classifier.batching.max_batch_size

    # (a) the in-process limit: the served models (same precision), all cores, same batch size
    torch.set_num_threads(os.cpu_count())
    models = load_models(serve_cfg, registry.tracking_uri, precision=True)
    limits = {name: limit(name, models, texts[name], serve_cfg, batch, args.duration)
              for name in PIPELINES}
    del models

    # (b) the naive baseline in its own process
    naive_port = args.port + 1
    naive = subprocess.Popen([sys.executable, __file__, "--naive-server", str(naive_port),
                              "--tracking-uri", registry.tracking_uri,
                              "--serve-config", serve_cfg.model_dump_json()])
    try:
        _wait_http(f"http://127.0.0.1:{naive_port}/v1/support/route")
        baseline = asyncio.run(measure_http(f"http://127.0.0.1:{naive_port}", args.concurrency,
                                            args.duration, texts))
    finally:
        naive.terminate()
        naive.wait()

    # Ray Serve, deployed from the same settings as `llmops up` (inference log included)
    cluster = start_ray(settings)
    cluster.deploy(serve_config(serve_cfg, registry.tracking_uri, False,
                                dict(runtime.PLATFORM_ENV), settings.log_settings()),
                   timeout_s=600)
    http = asyncio.run(measure_http(f"http://127.0.0.1:{args.port}", args.concurrency,
                                    args.duration, texts))
    handles = asyncio.run(measure_handles(args.concurrency, args.duration, texts))
    cluster.shutdown()
    ray.shutdown()

    report = {"benchmark": "serve_pipelines", "cpus": os.cpu_count(), "batch_size": batch,
              "models": models_of(args.data_dir),
              "precision": {k: md.precision for k, md in served_models(serve_cfg).items()},
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
