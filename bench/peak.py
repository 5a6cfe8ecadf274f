"""Peak load and the advisor's simulation, in one run.

    python bench/peak.py --json [--paths 200000] [--horizon 10]

1. Portfolio simulation throughput (`serve_apps/portfolio.py`): paths per second of one
   large request in this process (the baseline), as 1 Ray task, and as one task per CPU of a
   local Ray head; the ratios against the in-process run, and whether every run gave the same
   figures (they must: blocks are seeded by their index, not by their worker).

The traffic spike with and without the distilled fallback (issue 18 item 4) is not measured
yet: the fallback does not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import runtime  # noqa: E402
from serve_apps.portfolio import simulate  # noqa: E402
from serve_apps.portfolio_config import PortfolioConfig  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=200_000)
    parser.add_argument("--horizon", type=float, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"simulation": simulation(args.paths, args.horizon)}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
