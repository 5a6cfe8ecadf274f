"""Hot swap under load: failed requests, p99 latency before / during / after a model swap, and
seconds from the swap command to every replica serving the new version, in one run.

    python bench/swap.py --json [--phase 8] [--concurrency 8] [--replicas 2] [--placement P]

The `moderation` application runs with its classifier on `--replicas` replicas, inline in the
pipeline's replicas or in replicas of its own (`--placement`, default the platform's `auto`: inline
on CPU) (the configured
MiniLM architecture, two untrained versions registered in a scratch registry; rewriting is
switched off so every request costs the same). Closed-loop HTTP clients run through three
phases: steady on version 1, the swap to version 2 (`serve_apps.deploy.swap`, what
`llmops swap` calls), and steady on version 2. Every response names the version that answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import TLS_HELP, https_settings, platform, start_ray  # noqa: E402

from cluster import runtime  # noqa: E402
from training.data import generate  # noqa: E402


def p99(rows: list[tuple]) -> float | None:
    lat = [end - start for start, end, *_ in rows]
    return round(float(np.percentile(lat, 99)) * 1000, 1) if lat else None


async def drive(url: str, texts: list[str], concurrency: int, log: list, stop: asyncio.Event,
                verify):
    import httpx

    async def worker(k: int) -> None:
        i = k
        async with httpx.AsyncClient(timeout=60, verify=verify) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    r = await client.post(url, json={"text": texts[i % len(texts)]})
                    version = (r.json()["results"][0]["models"]["classifier"]["version"]
                               if r.status_code == 200 else None)
                    log.append((started, time.perf_counter(), r.status_code, version))
                except Exception as exc:  # a failed request is what this measures
                    log.append((started, time.perf_counter(), type(exc).__name__, None))
                i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def run(args, cluster, tracking_uri: str, url: str, verify) -> dict:
    from serve_apps.deploy import swap

    texts = list(generate("moderation", "base", 256, seed=3).text)
    log: list = []
    stop = asyncio.Event()
    load = asyncio.create_task(drive(url, texts, args.concurrency, log, stop, verify))
    await asyncio.sleep(args.phase)
    swap_start = time.perf_counter()
    result = await asyncio.to_thread(swap, cluster, "moderation", tracking_uri, version=2)
    swap_end = time.perf_counter()
    await asyncio.sleep(args.phase)
    stop.set()
    await load

    before = [r for r in log if r[1] < swap_start]
    during = [r for r in log if r[0] < swap_end and r[1] >= swap_start]
    after = [r for r in log if r[0] >= swap_end]
    new = [r[1] for r in log if r[3] == "2"]
    steady = p99(before)
    return {
        "requests": len(log), "failed": sum(1 for r in log if r[2] != 200),
        "p99_ms": {"before": steady, "during": p99(during), "after": p99(after)},
        "p99_during_over_before": round(p99(during) / steady, 3) if during and steady else None,
        "requests_during": len(during),
        "swap_seconds_command_to_all_replicas": round(swap_end - swap_start, 2),
        "first_v2_answer_after_s": round(min(new) - swap_start, 2) if new else None,
        "old_version_answers_after_swap": sum(1 for r in after if r[3] != "2"),
        "versions_seen": sorted({r[3] for r in log if r[3]}), "deployments": result["deployments"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=float, default=8.0, help="seconds before and after")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--placement", choices=["auto", "inline", "replica"], default="auto")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--tls", action="store_true", help=TLS_HELP)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray

    from serve_apps.config import ServeConfig
    from serve_apps.deploy import serve_config
    from serve_apps.tls import client_context

    settings, registry = platform(None, versions=2)
    fixed = {"min_replicas": args.replicas, "max_replicas": args.replicas}
    cfg = ServeConfig.model_validate({
        "port": args.port, "use_gpu": "no", "support": {"enabled": False},
        **https_settings(args.tls),
        "chat": {"enabled": False},
        "moderation": {"rewrite_labels": [], "block_labels": [],
                       "autoscaling": fixed if args.placement != "replica" else None,
                       "classifier": {"model": "models:/moderation/1", "autoscaling": fixed,
                                      "placement": args.placement}}})
    cluster = start_ray(settings)
    cluster.deploy(serve_config(cfg, registry.tracking_uri, False, dict(runtime.PLATFORM_ENV)),
                   timeout_s=600)
    result = asyncio.run(run(args, cluster, registry.tracking_uri, f"{cfg.url}/v1/moderate",
                             client_context(cfg.tls)))
    cluster.shutdown()
    ray.shutdown()
    report = {"benchmark": "hot_swap_under_load", "cpus": os.cpu_count(), "tls": args.tls,
              "replicas": args.replicas, "placement": args.placement,
              "concurrency": args.concurrency, **result}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
