"""What governance costs: throughput and latency of the `support` and `moderation` pipelines over
HTTP with every policy on (bearer token verified, quota reserved and committed with the quota
authority, input and output guardrails, an audit record fsynced before each answer) against
the same deployment with no policies, in one run on one Ray instance.

    python bench/governance.py --json [--duration 8] [--concurrency 8 32] [--data-dir DIR]

The phases alternate off, on, off (the ingress is redeployed between them; the models stay),
so a drift of the machine over the run shows as a difference between the two `off` phases.
The tenant has no rate limit or budget here (the quota is still reserved and committed).
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

import stack  # noqa: E402
from serve import closed_loop  # noqa: E402

from cluster import runtime  # noqa: E402

POLICIES = ("audit", "auth", "quota", "guardrails")


async def measure(base: str, headers: dict, concurrencies: list[int], duration: float,
                  texts: dict, verify) -> dict:
    import httpx

    out = {}
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers,
                                 verify=verify) as client:
        for name, (_, path, _) in stack.PIPELINES.items():
            async def call(text: str, url: str = base + path) -> None:
                r = await client.post(url, json={"text": text})
                r.raise_for_status()

            await closed_loop(call, texts[name], 4, 1.0)  # warm-up
            out[name] = {f"c{c}": await closed_loop(call, texts[name], c, duration)
                         for c in concurrencies}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--data-dir", help="a data dir with trained champions (default: scratch)")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--tls", action="store_true", help=stack.TLS_HELP)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="the policies of the `on` phase (default: all, in their order)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray

    from serve_apps.auth import issue
    from serve_apps.deploy import serve_config
    from serve_apps.tls import client_context

    settings, registry = stack.platform(args.data_dir, {
        "serve": {"port": args.port, "use_gpu": "no", "chat": {"enabled": False},
                  "advisor": {"enabled": False},
                  "quota": {"tenants": {"bench": stack.UNLIMITED}}, **stack.https_settings(args.tls),
                  **{app: {"policies": args.policies} for app in stack.PIPELINES}}})
    texts = stack.sample_texts(11)
    token = issue(settings.serve.auth, settings.data_dir, tenant="bench",
                  scopes=["moderate", "support"], ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}

    cluster = stack.start_ray(settings)
    base, verify = settings.serve.url, client_context(settings.serve.tls)
    phases = []
    for governed in (False, True, False):
        config = serve_config(settings.serve, registry.tracking_uri, False,
                              dict(runtime.PLATFORM_ENV), settings.log_settings(),
                              settings.governance() if governed else None)
        cluster.deploy(config, timeout_s=600)
        phases.append(asyncio.run(measure(base, headers, args.concurrency, args.duration,
                                          texts, verify)))
    cluster.shutdown()
    ray.shutdown()

    off_a, on, off_b = phases
    report = {"benchmark": "governance", "cpus": os.cpu_count(), "tls": args.tls, "policies": args.policies,
              "models": stack.models_of(args.data_dir), "duration_s": args.duration,
              "policies_off": off_a, "policies_on": on, "policies_off_again": off_b,
              "ratios": {}}
    for name in stack.PIPELINES:
        for c in args.concurrency:
            key = f"c{c}"
            off_rps = (off_a[name][key]["rps"] + off_b[name][key]["rps"]) / 2
            off_p99 = (off_a[name][key]["p99_ms"] + off_b[name][key]["p99_ms"]) / 2
            report["ratios"][f"{name}_{key}"] = {
                "throughput_on_vs_off": round(on[name][key]["rps"] / off_rps, 3),
                "p99_on_vs_off": round(on[name][key]["p99_ms"] / off_p99, 3),
                "failed_on": on[name][key]["failed"]}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
