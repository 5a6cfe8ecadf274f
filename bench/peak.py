"""Peak load and the advisor's simulation, in one run.

    python bench/peak.py --json [--paths 200000] [--horizon 10]
                                [--data-dir .llmops] [--pipeline moderation|chat]
                                [--factor 3] [--duration 20]

1. Portfolio simulation throughput (`serve_apps/portfolio.py`): paths per second of one
   large request in this process (the baseline), as 1 Ray task, and as one task per CPU of a
   local Ray head; the ratios against the in-process run, and whether every run gave the same
   figures (they must: blocks are seeded by their index, not by their worker).
2. With `--data-dir` (a data dir holding trained champions, `make demo`): a traffic spike on the
   `--pipeline` as `llmops up` deploys it, at `--factor` times the rate the champion sustains
   (measured first: a closed loop of 8 clients), open loop (requests sent on schedule whatever
   the answers) for `--duration` seconds, with the peak fallback off and then on (the
   champion's distilled student, `llmops distill TASK`, run first if the registry has no
   `fallback`; the default thresholds). `moderation` switches its classifier (posts to rewrite
   hidden while on); `chat` its generator, the rewriter, whose student then writes the
   answers. Per run: requests sent, answered, shed (503), failed otherwise, p50/p99 latency of
   the answered, accuracy (moderation: verdicts right against the data generator's labels;
   chat: mean token F1 of the answers against the reference rewrites), the share the fallback
   answered; and the on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import runtime  # noqa: E402
from serve_apps.portfolio import simulate  # noqa: E402
from serve_apps.portfolio_config import PortfolioConfig  # noqa: E402
from training.evaluate import token_f1  # noqa: E402

REQUEST = {"holdings": {"us_equity": 0.45, "intl_equity": 0.15, "em_equity": 0.05,
                        "govt_bonds": 0.25, "corp_bonds": 0.05, "cash": 0.05},
           "risk_profile": "balanced", "seed": 2026}


def timed(request: dict, config: PortfolioConfig, workers: int) -> tuple[float, dict]:
    # warm: imports, and one block per task so that every Ray worker has started
    simulate({**request, "paths": config.block_paths * max(workers, 1)}, config, workers=workers)
    began = time.perf_counter()
    out = simulate(request, config, workers=workers)
    return time.perf_counter() - began, out["figures"]


def simulation(paths: int, horizon: float) -> dict:
    import ray

    cpus = os.cpu_count() or 1
    config = PortfolioConfig(max_paths=max(paths, 1000), max_workers=cpus)
    request = {**REQUEST, "paths": paths, "horizon_years": horizon}
    runtime.apply_platform_env()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        runs = {name: timed(request, config, workers)
                for name, workers in (("in_process", 0), ("ray_1_task", 1),
                                      (f"ray_{cpus}_tasks", cpus))}
    finally:
        ray.shutdown()
    base = runs["in_process"][0]
    steps = round(horizon * config.periods_per_year)
    return {"paths": paths, "steps": steps, "cpus": cpus,
            "paths_per_s": {k: round(paths / s) for k, (s, _) in runs.items()},
            "speedup_vs_in_process": {k: round(base / s, 2) for k, (s, _) in runs.items()},
            "same_figures": all(f == runs["in_process"][1] for _, f in runs.values())}


@dataclass(frozen=True)
class Target:
    """A pipeline the spike hits: where, the task whose student answers at a peak (the stage
    whose `fallback` switches), what a row's request is and how its answer scores (1.0: right)
    and whether the fallback gave it."""

    path: str
    task: str
    stage: str
    body: Callable[[object], dict]
    judge: Callable[[object, dict], tuple[float, bool]]


TARGETS = {
    "moderation": Target("", "moderation", "classifier", lambda row: {"text": row.text},
                         lambda row, out: (float(out["results"][0]["verdict"] == row.label),
                                           out.get("served_by") == "fallback")),
    "chat": Target("/chat/completions", "rewriter", "generator",
                   lambda row: {"model": "rewriter",
                                "messages": [{"role": "user", "content": row.text}]},
                   lambda row, out: (token_f1(out["choices"][0]["message"]["content"],
                                              row.rewrite),
                                     out["llmops"].get("served_by") == "fallback")),
}


async def open_loop(url: str, headers: dict, rows, rate: float, duration: float,
                    target: Target) -> dict:
    """Requests at `rate` per second for `duration` s, each sent on schedule whatever the
    others; the answers' latency, outcome and score (`Target.judge`)."""
    import httpx
    import numpy as np

    outcomes: list[tuple[str, float, float, bool]] = []  # (outcome, latency, score, fallback)

    async def one(client, row) -> None:
        started = time.perf_counter()
        try:
            r = await client.post(url, json=target.body(row), headers=headers)
        except httpx.HTTPError:
            outcomes.append(("failed", 0.0, 0.0, False))
            return
        latency = time.perf_counter() - started
        if r.status_code == 503:
            outcomes.append(("shed", latency, 0.0, False))
        elif r.status_code != 200:
            outcomes.append(("failed", latency, 0.0, False))
        else:
            outcomes.append(("ok", latency, *target.judge(row, r.json())))

    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks, began, n = [], time.perf_counter(), int(rate * duration)
        for i in range(n):
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, rows[i % len(rows)])))
        await asyncio.gather(*tasks)
    ok = [o for o in outcomes if o[0] == "ok"]
    lat = np.array([o[1] for o in ok]) * 1000 if ok else np.array([0.0])
    return {"sent": n, "rate": round(rate, 1), "answered": len(ok),
            "shed": sum(o[0] == "shed" for o in outcomes),
            "failed": sum(o[0] == "failed" for o in outcomes),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "accuracy": round(sum(o[2] for o in ok) / max(len(ok), 1), 4),
            "fallback_share": round(sum(o[3] for o in ok) / max(len(ok), 1), 3)}


async def sustainable(url: str, headers: dict, rows, duration: float, target: Target) -> dict:
    """What 8 clients back to back get through (after a warm-up of 4 for 2 s)."""
    import httpx

    sys.path.insert(0, str(ROOT / "bench"))
    from serve import closed_loop

    async with httpx.AsyncClient(timeout=60) as client:
        async def call(row) -> None:
            r = await client.post(url, json=target.body(row), headers=headers)
            r.raise_for_status()

        await closed_loop(call, rows, 4, 2)
        return await closed_loop(call, rows, 8, duration)


def spike(data_dir: str, pipeline: str, factor: float, duration: float, port: int) -> dict:
    import subprocess

    import ray

    sys.path.insert(0, str(ROOT / "bench"))
    from stack import UNLIMITED, platform, start_ray

    from serve_apps.auth import issue
    from serve_apps.config import ServeConfig
    from serve_apps.deploy import serve_config
    from training.data import generate
    from training.registry import FALLBACK

    target = TARGETS[pipeline]
    settings, registry = platform(data_dir, {"serve": {"quota": {"tenants": {
        "bench": UNLIMITED}}}})
    if registry.alias_version(target.task, FALLBACK) is None:
        subprocess.run([sys.executable, "-m", "cluster.cli", "distill", target.task,
                        "--data-dir", data_dir], check=True, stdout=sys.stderr)
    student = registry.alias_version(target.task, FALLBACK)
    task = settings.training.task(target.task)
    rows = list(generate(task.dataset, "base", 1024, seed=29,
                         priors=task.label_priors).itertuples())
    token = issue(settings.serve.auth, settings.data_dir, tenant="bench",
                  scopes=["moderate", "chat"], ttl_s=3600)
    headers = {"Authorization": f"Bearer {token}"}
    cluster = start_ray(settings)
    runs, sustained = {}, None
    try:
        for mode in ("off", "on"):
            cfg = settings.serve.model_dump()
            cfg.update(port=port, use_gpu="no", **{a: {"enabled": False} for a in (
                "moderation", "support", "chat", "feedback", "advisor") if a != pipeline})
            if mode == "on":
                cfg[pipeline][target.stage]["fallback"] = {
                    "model": f"models:/{target.task}@fallback"}
            serve_cfg = ServeConfig.model_validate(cfg)
            cluster.deploy(serve_config(serve_cfg, registry.tracking_uri, False,
                                        dict(runtime.PLATFORM_ENV), settings.log_settings(),
                                        settings.governance()), timeout_s=600)
            url = f"{serve_cfg.url}{getattr(serve_cfg, pipeline).route_prefix}{target.path}"

            measured = asyncio.run(sustainable(url, headers, rows, duration / 2,
                                               target))  # also each run's warm-up
            sustained = sustained or measured
            runs[mode] = asyncio.run(open_loop(url, headers, rows, factor * sustained["rps"],
                                               duration, target))
            time.sleep(2)
    finally:
        cluster.shutdown()
        ray.shutdown()
    off, on = runs["off"], runs["on"]
    return {"pipeline": pipeline, "factor": factor, "duration_s": duration,
            "fallback_version": student, "sustainable": sustained, **runs,
            "on_vs_off": {"p99": round(on["p99_ms"] / max(off["p99_ms"], 0.1), 3),
                          "shed": f"{on['shed']} vs {off['shed']}",
                          "accuracy_points": round((on["accuracy"] - off["accuracy"]) * 100, 2)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=200_000)
    parser.add_argument("--horizon", type=float, default=10)
    parser.add_argument("--data-dir", help="trained champions: adds the traffic spike")
    parser.add_argument("--pipeline", choices=sorted(TARGETS), default="moderation")
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report_to, sys.stdout = sys.stdout, sys.stderr  # what Ray prints: not the report
    result = {"simulation": simulation(args.paths, args.horizon)}
    if args.data_dir:
        result["spike"] = spike(str(Path(args.data_dir).resolve()), args.pipeline, args.factor,
                                args.duration, args.port)
    sys.stdout = report_to
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
