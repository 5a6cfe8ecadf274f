"""Macro-F1 of registered router versions on fresh traffic of a scenario against their true
labels, each as a share of a baseline version's on clean traffic: how `bench/loop.py` reads a
run's outcome (`cluster.demo.quality`), for the versions earlier runs registered (re-read on
more rows, or another scenario); with `--error-rates`, how each would abstain there at each
conformal error rate (share answered and its precision against the true labels, as
`bench/loop.py` reports the served version at the configured one).

    python bench/quality.py --json --data-dir DIR --versions 14 15 16 [--baseline 1]
                            [--scenario concept-shift] [--rows 5000] [--error-rates 0.04 0.05]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack import report  # noqa: E402

from cluster.demo import MODEL, scored_tickets  # noqa: E402
from training.data import SCENARIOS  # noqa: E402
from training.registry import Registry  # noqa: E402


def measure(settings, args: argparse.Namespace) -> dict:
    from training.evaluate import abstention_metrics, score

    registry = Registry(settings.registry, settings.data_dir)
    clean, drifted, _ = scored_tickets(args.scenario, args.rows)
    before = score(registry.load_model(MODEL, args.baseline), clean, "macro_f1")
    versions = {}
    for v in args.versions:  # each version predicted once
        readings = abstention_metrics(registry.load_model(MODEL, v), drifted,
                                      args.error_rates or [None])
        f1 = readings[0]["macro_f1"]
        versions[f"v{v}"] = {"macro_f1": f1, "recovered": round(f1 / before, 3)}
        if args.error_rates:
            versions[f"v{v}"]["abstention"] = {
                str(rate): {k: figures[k] for k in ("coverage", "precision")}
                for rate, figures in zip(args.error_rates, readings)}
    return {"model": MODEL, "scenario": args.scenario, "rows": args.rows,
            "baseline": {"version": args.baseline, "clean_macro_f1": round(before, 4)},
            "versions": versions}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, nargs="+", required=True)
    parser.add_argument("--baseline", type=int, default=1,
                        help="the version whose clean macro-F1 is the level to recover")
    parser.add_argument("--scenario", default="concept-shift",
                        choices=[s for s in SCENARIOS if s != "base"])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--error-rates", type=float, nargs="*", default=[],
                        help="conformal error rates to read each version's abstention at")
    report(parser, measure)
