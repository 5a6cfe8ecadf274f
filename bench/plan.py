"""A concept-shift retrain's plan (`training.retrain.retraining_plan`: the contradiction check
over the labels, the replay, the golden rows and the traffic since the onset) as the controller
builds it at each step while it waits for labels: its first step, every text new to the
process, against its next, one batch of requests later, in the same process.

    python bench/plan.py --json --data-dir DIR [--version 1] [--requests 1500] [--batch 250]

The router's `--version` (the demo's champion by default) answers `--requests` concept-shifted
tickets, a tenth of them labelled, as the loop's traffic since a drift's onset; its replay and
golden rows are those it was registered with.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack import report  # noqa: E402

from cluster.demo import MODEL  # noqa: E402
from training.registry import CHAMPION, GOLDEN_FILE, REFERENCE_FILE, Registry  # noqa: E402


def measure(settings, args: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd

    from training.data import generate
    from training.retrain import retraining_plan

    registry = Registry(settings.registry, settings.data_dir)
    version = str(args.version or registry.alias_version(MODEL, CHAMPION))
    model = registry.load_model(MODEL, version)
    onset = datetime.now(UTC) - timedelta(hours=1)

    def traffic(n: int, seed: int, start: int) -> pd.DataFrame:
        rows = generate("support-tickets", "concept-shift", n, seed=seed)
        return pd.DataFrame({
            "text": rows.text, "label": rows.label.where(np.arange(n) % 10 == 0),
            "prediction": model.predict(None, rows[["text"]])["label"],
            "ts": [onset + timedelta(seconds=start + i) for i in range(n)]})

    reference = registry.run_data(MODEL, version, REFERENCE_FILE)
    golden = registry.run_data(MODEL, version, GOLDEN_FILE)
    recent, steps = traffic(args.requests, 1, 0), {}
    for step in ("first", "next"):
        if step == "next":
            recent = pd.concat([recent, traffic(args.batch, 2, args.requests)], ignore_index=True)
        started = time.perf_counter()
        plan = retraining_plan(recent, reference, golden, settings.training.retrain, onset=onset)
        steps[step] = {"seconds": round(time.perf_counter() - started, 1),
                       "requests": len(recent), "labelled": plan.notes["labelled"],
                       "moves": sorted(plan.found.moved)}
    return {"model": MODEL, "version": version, "replay_rows": len(reference),
            "golden_rows": len(golden), "steps": steps,
            "next_over_first": round(steps["next"]["seconds"] / steps["first"]["seconds"], 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, default=None,
                        help="the router version (default: the champion)")
    parser.add_argument("--requests", type=int, default=1500,
                        help="requests since the onset at the first step")
    parser.add_argument("--batch", type=int, default=250, help="requests new at the next step")
    report(parser, measure)
