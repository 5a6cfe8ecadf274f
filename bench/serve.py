"""Serving throughput, latency and CPU of the `support` and `moderation` pipelines as the
platform serves them (every policy and the inference log on), over HTTP and over handles,
against its peers on the same models with the same batch size (`bench/peers.py`): the model
calls in-process (the limit), a naive FastAPI + transformers server, a no-op Serve deployment
(Serve's own floor), a plain Ray Serve application with `@serve.batch` and a BentoML service
with adaptive batching (`bench/bento_peer.py`, after `make bench-env`), all in one run. Every
cell reports the CPU milliseconds a request cost in each process (`stack.CpuMeter`: proxy,
ingress, each model replica, the audit and quota actors, Ray's own, the load generator), and
one more run at the top concurrency under py-spy splits each Serve process's milliseconds by
stage (`cpu_ms_by_stage`: model forward, log and features, guardrails, policies, HTTP and
schemas, the pipeline's own code, Serve and Ray, asyncio, other; `stack.Profile`).

    python bench/serve.py --json [--duration 8] [--concurrency 1 8 32] [--data-dir DIR]
                          [--placement inline|replica] [--precision int8]

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

from peers import (  # noqa: E402
    BENTOML,
    bentoml_server,
    load_models,
    naive_server,
    noop_app,
    plain_serve_app,
    run_pipeline,
    served_models,
)
from stack import (  # noqa: E402
    PIPELINES,
    TLS_HELP,
    UNLIMITED,
    CpuMeter,
    Profile,
    component,
    https_settings,
    models_of,
    platform,
    ray_processes,
    sample_texts,
    start_ray,
)

from cluster import runtime  # noqa: E402
from serve_apps.config import ServeConfig  # noqa: E402

# the bench's caller: its token (HTTP) or stated principal (handles), with no quota limits
PRINCIPAL = {"subject": "bench", "tenant": "bench", "scopes": ["moderate", "support"]}


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


def http_call(client, url: str, listed: bool = False):
    """A request of one text: `{"text": ...}`, or `{"texts": [...]}` where the server batches
    lists (BentoML)."""
    async def call(text: str) -> None:
        r = await client.post(url, json={"texts": [text]} if listed else {"text": text})
        r.raise_for_status()
    return call


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


async def metered(call, texts: list[str], concurrencies: list[int], duration: float,
                  extra: dict[int, str] | None = None, profile: bool = False) -> dict:
    """`closed_loop` at each concurrency after a warm-up, each with the CPU milliseconds a
    request cost in every process (`stack.CpuMeter`). With `profile`, one more run at the top
    concurrency under py-spy (apart: the profiler takes CPU of its own) splits the milliseconds of
    each Serve process and of the quota and audit actors by stage (`stack.Profile`)."""
    await closed_loop(call, texts, 4, 1.0)
    out = {}
    for c in concurrencies:
        with CpuMeter(extra) as meter:
            out[f"c{c}"] = await closed_loop(call, texts, c, duration)
        out[f"c{c}"]["cpu_ms_per_request"] = meter.per_request_ms(out[f"c{c}"]["requests"])
    if profile:
        serving = {pid: component(title) for pid, title in ray_processes().items()
                   if title.startswith(("ray::ServeReplica", "ray::ProxyActor",
                                        "ray::QuotaAuthority", "ray::AuditLogger"))}
        with CpuMeter() as meter, Profile(serving, duration) as spy:
            cell = await closed_loop(call, texts, max(concurrencies), duration)
        ms = meter.per_request_ms(cell["requests"])
        out["cpu_ms_by_stage"] = {name: {stage: round(share * ms.get(name, 0.0), 2)
                                         for stage, share in shares.items()}
                                  for name, shares in spy.shares().items()}
    return out


async def measure_http(base: str, concurrencies: list[int], duration: float, texts: dict,
                       extra: dict[int, str] | None = None, headers: dict | None = None,
                       profile: bool = False, listed: bool = False, verify=True) -> dict:
    """Each pipeline of `texts` over HTTP(S: `verify` as `serve_apps.tls.client_context`)."""
    import httpx

    out = {}
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers,
                                 verify=verify) as client:
        for name, (_, path, _) in PIPELINES.items():
            if name not in texts:
                continue
            out[name] = await metered(http_call(client, base + path, listed), texts[name],
                                      concurrencies, duration, extra, profile)
    return out


async def measure_handles(concurrencies: list[int], duration: float, texts: dict,
                          principal: dict | None = None) -> dict:
    """Each pipeline through its application handle, as in-cluster code stating `principal`."""
    from ray import serve

    out = {}
    for name, (_, _, method) in PIPELINES.items():
        handle = getattr(serve.get_app_handle(name), method)

        async def call(text: str) -> None:
            await handle.remote({"text": text}, None, principal)  # noqa: B023

        out[name] = await metered(call, texts[name], concurrencies, duration)
    return out


def bentoml_peer(port: int, tracking_uri: str, cfg: ServeConfig, concurrencies: list[int],
                 duration: float, texts: dict) -> dict | None:
    """BentoML with adaptive batching (`bench/bento_peer.py`), from its own environment; None
    (and a line on stderr) where `make bench-env` has not made it."""
    if not BENTOML.exists():
        print(f"no BentoML peer: {BENTOML} is missing (make bench-env)", file=sys.stderr)
        return None
    with bentoml_server(port, tracking_uri, cfg) as (base, pids):
        return asyncio.run(measure_http(base, concurrencies, duration, texts,
                                        dict.fromkeys(pids, "bentoml"), listed=True))


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


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--data-dir", help="a data dir with trained champions (default: scratch)")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--precision", choices=["auto", "fp32", "int8"],
                        help="override every served model's precision (default: settings)")
    parser.add_argument("--placement", choices=["auto", "inline", "replica"],
                        help="override every served model's placement (default: settings)")
    parser.add_argument("--tls", action="store_true", help=TLS_HELP + " (the Serve runs: the "
                        "platform, the no-op and the plain app; the naive and BentoML peers stay "
                        "on HTTP)")
    parser.add_argument("--naive-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--serve-config", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def _served(settings, args: argparse.Namespace) -> ServeConfig:
    """The platform's serve settings on the benchmark's port, with the overrides asked for."""
    cfg = settings.serve.model_dump()
    cfg.update(port=args.port, use_gpu="no", chat={"enabled": False},
               advisor={"enabled": False})
    for app, deps in (("support", ("classifier", "encoder", "generator")),
                      ("moderation", ("classifier", "generator"))):
        for dep in deps:
            for key in ("precision", "placement"):
                if getattr(args, key):
                    cfg[app][dep][key] = getattr(args, key)
    return ServeConfig.model_validate(cfg)


def _naive(args: argparse.Namespace, tracking_uri: str, serve_cfg: ServeConfig,
           texts: dict) -> dict:
    """The naive baseline, in its own process."""
    naive_port = args.port + 1
    naive = subprocess.Popen([sys.executable, __file__, "--naive-server", str(naive_port),
                              "--tracking-uri", tracking_uri,
                              "--serve-config", serve_cfg.model_dump_json()])
    try:
        _wait_http(f"http://127.0.0.1:{naive_port}/v1/support/route")
        return asyncio.run(measure_http(f"http://127.0.0.1:{naive_port}", args.concurrency,
                                        args.duration, texts, {naive.pid: "naive server"}))
    finally:
        naive.terminate()
        naive.wait()


def _on_serve(args: argparse.Namespace, settings, registry, serve_cfg: ServeConfig,
              texts: dict, batch: int) -> tuple[dict, dict, dict, dict]:
    """The platform over HTTP and through handles, then Serve's floor and a plain Serve app."""
    import ray
    from ray import serve

    from serve_apps.auth import issue
    from serve_apps.deploy import serve_config
    from serve_apps.tls import client_context, http_options

    token = issue(settings.serve.auth, settings.data_dir, tenant=PRINCIPAL["tenant"],
                  scopes=PRINCIPAL["scopes"], ttl_s=3600)
    # (c) the platform, deployed as `llmops up` deploys it: every policy, the inference log
    base, verify = serve_cfg.url, client_context(serve_cfg.tls)
    cluster = start_ray(settings)
    cluster.deploy(serve_config(serve_cfg, registry.tracking_uri, False,
                                dict(runtime.PLATFORM_ENV), settings.log_settings(),
                                settings.governance()), timeout_s=600)
    http = asyncio.run(measure_http(base, args.concurrency, args.duration, texts,
                                    headers={"Authorization": f"Bearer {token}"}, profile=True,
                                    verify=verify))
    handles = asyncio.run(measure_handles(args.concurrency, args.duration, texts, PRINCIPAL))
    cluster.shutdown()

    # (d) Serve's own floor (a no-op deployment), then (e) a plain Serve application
    serve.start(http_options=http_options(serve_cfg))
    serve.run(noop_app(), name="noop", route_prefix="/")
    noop = asyncio.run(measure_http(base, args.concurrency, args.duration,
                                    {"moderation": texts["moderation"]}, verify=verify))["moderation"]
    serve.delete("noop")
    serve.run(plain_serve_app(registry.tracking_uri, serve_cfg, batch), name="plain",
              route_prefix="/")
    plain = asyncio.run(measure_http(base, args.concurrency, args.duration, texts, profile=True,
                                     verify=verify))
    serve.shutdown()
    ray.shutdown()
    return http, handles, noop, plain


def main() -> None:
    args = _args()
    report_to, sys.stdout = sys.stdout, sys.stderr  # what Ray prints to the driver: not the report
    runtime.apply_platform_env()
    if args.naive_server:
        return naive_server(args.naive_server, args.tracking_uri,
                            ServeConfig.model_validate_json(args.serve_config))
    import torch

    settings, registry = platform(args.data_dir, {"serve": {"quota": {"tenants": {
        PRINCIPAL["tenant"]: UNLIMITED}}, **https_settings(args.tls)}})
    texts = sample_texts(11)
    serve_cfg = _served(settings, args)
    batch = serve_cfg.support.classifier.batching.max_batch_size

    # (a) the in-process limit: the served models (same precision), all cores, same batch size
    torch.set_num_threads(os.cpu_count())
    models = load_models(serve_cfg, registry.tracking_uri, precision=True)
    limits = {name: limit(name, models, texts[name], serve_cfg, batch, args.duration)
              for name in PIPELINES}
    del models
    baseline = _naive(args, registry.tracking_uri, serve_cfg, texts)  # (b)
    http, handles, noop, plain = _on_serve(args, settings, registry, serve_cfg, texts, batch)
    # (f) BentoML, in a process tree of its own
    bento = bentoml_peer(args.port + 2, registry.tracking_uri, serve_cfg, args.concurrency,
                         args.duration, texts)

    report = {"benchmark": "serve_pipelines", "cpus": os.cpu_count(), "batch_size": batch,
              "tls": args.tls,
              "models": models_of(args.data_dir),
              "precision": {k: md.precision for k, md in served_models(serve_cfg).items()},
              "placement": {k: md.placement for k, md in served_models(serve_cfg).items()},
              "duration_s": args.duration, "in_process_limit": limits,
              "naive_fastapi": baseline, "serve_noop": noop, "plain_serve": plain,
              "bentoml": bento, "platform_http": http, "platform_handle": handles,
              "ratios": ratios(limits, baseline, noop, plain, bento, http, handles,
                               f"c{max(args.concurrency)}")}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2), file=report_to)


def ratios(limits: dict, naive: dict, noop: dict, plain: dict, bento: dict | None, http: dict,
           handles: dict, top: str) -> dict:
    """At the top concurrency, per pipeline: the bound a Serve application can reach here
    (1 / (1/no-op + 1/in-process limit)), each way of serving as a share of the limit, of the
    bound and of each peer, and the CPU a platform request costs beyond a plain Serve one; and
    the highest measured concurrency at which the platform's HTTP p99 stays under a second."""
    out = {}
    for name in PIPELINES:
        bound = 1 / (1 / noop[top]["rps"] + 1 / limits[name]["rps"])
        under_1s = [int(c[1:]) for c, cell in http[name].items()
                    if c[1:].isdigit() and cell["p99_ms"] < 1000]
        out[name] = {"bound_rps": round(bound, 1), "platform_cpu_ms_beyond_plain_serve": round(
            http[name][top]["cpu_ms_per_request"]["total"]
            - plain[name][top]["cpu_ms_per_request"]["total"], 2),
            "http_p99_under_1s_up_to_concurrency": max(under_1s, default=None)}
        peers = {"naive_fastapi": naive, "plain_serve": plain, "bentoml": bento}
        for way, results in (("platform_http", http), ("platform_handle", handles), *(
                (peer, results) for peer, results in peers.items() if results)):
            rps = results[name][top]["rps"]
            out[name][way] = {
                "vs_in_process_limit": round(rps / limits[name]["rps"], 3),
                "vs_bound": round(rps / bound, 3),
                **{f"vs_{peer}": round(rps / other[name][top]["rps"], 3)
                   for peer, other in peers.items() if other}}
    return out


if __name__ == "__main__":
    main()
