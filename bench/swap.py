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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import TLS_HELP, https_settings, platform, start_ray, swap_under_load  # noqa: E402

from cluster import runtime  # noqa: E402
from training.data import generate  # noqa: E402


async def run(args, cluster, tracking_uri: str, url: str, verify) -> dict:
    from serve_apps.deploy import swap

    texts = list(generate("moderation", "base", 256, seed=3).text)
    out = await swap_under_load(
        url, lambda i: {"text": texts[i % len(texts)]},
        lambda answer: answer["results"][0]["models"]["classifier"]["version"],
        args.concurrency, args.phase,
        lambda: swap(cluster, "moderation", tracking_uri, version=2), "2", verify)
    p99 = out["p99_ms"]
    out["p99_during_over_before"] = round(p99["during"] / p99["before"], 3) \
        if p99["during"] and p99["before"] else None
    out["deployments"] = out.pop("result")["deployments"]
    return out


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
        "chat": {"enabled": False}, "advisor": {"enabled": False},
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
