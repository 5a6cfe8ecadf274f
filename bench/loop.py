"""The closed loop per drift scenario: seconds from drift onset to detection, to new priors
(a label shift) or a registered challenger, and to the new champion serving; macro-F1 on the
drifted traffic before and after, on `--quality-rows` fresh rows (against the champion's
macro-F1 on clean traffic, the level to recover); how the served model abstains there
(calibration error, coverage, precision of the answers it gives); retrains; labels used; failed
requests.

    python bench/loop.py --json [--scenarios new-product slang ...] [--data-dir .llmops]
                         [--labels 0.1] [--baseline-labels 0.3] [--settle REQUESTS]
                         [--quality-rows 5000] [--moves INTENT=LABEL ...]

Runs on the demo's stack (`make demo` trains the champions; the pipelines are deployed if they
are not): for each scenario, what `llmops demo` does after its setup (clean traffic, then the
scenario with a `--labels` share of each batch labelled from the platform's queue of pending
labels, the support router's controller stepping every `controller.interval_s`), then the same
with a `--baseline-labels` share labelled at random (0: no baseline). Before each run the
router's first champion is restored (`llmops rollback --to-version`, `--from-version` picks it)
with its training priors and profile, so every run starts from the same model; the retrain
cooldown and daily budget are lifted. Where the loop comes back to serving, the drifted traffic
goes on until the drift checks have seen it (`--settle` requests, and one window more while
the last checks hold a drifted window): a retrain that missed part of the drift, or a drift
still declared, starts the loop again, and the run reports where the loop settles, not its
first step. `--moves` replaces the support lexicon's reorganisation (the concept shift's
moved intents) by others, to measure the loop on a shift its thresholds were not chosen on.
Each row's baselines: the old champion's macro-F1 on the
drifted traffic, and the random-labelling run of the same scenario.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import demo, traffic  # noqa: E402
from cluster.controller import Controller  # noqa: E402
from cluster.loop import stop  # noqa: E402
from cluster.settings import Settings, load_settings  # noqa: E402
from cluster.state import StateStore  # noqa: E402
from training.data import SCENARIOS, reorganise  # noqa: E402
from training.errors import LLMOpsError  # noqa: E402
from training.registry import CHAMPION, Registry  # noqa: E402


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=[s for s in SCENARIOS if s != "base"],
                        choices=[s for s in SCENARIOS if s != "base"])
    parser.add_argument("--from-version", type=int, default=None,
                        help="the router version every scenario starts from (default: the champion)")
    parser.add_argument("--labels", type=float, default=0.1,
                        help="share of each drifted batch labelled from the queue")
    parser.add_argument("--baseline-labels", type=float, default=0.3,
                        help="share labelled at random in the baseline run (0: none)")
    parser.add_argument("--settle", type=int, default=None,
                        help="drifted requests a new champion answers with the controller still "
                             "serving before the run ends (default: the drift check's n windows; "
                             "0: end at the first promotion)")
    parser.add_argument("--quality-rows", type=int, default=5000,
                        help="fresh rows each macro-F1 is measured on (the demo's 1,000 read a "
                             "version up to 0.007 off its macro-F1 on 10,000)")
    parser.add_argument("--moves", nargs="+", type=_move, metavar="INTENT=LABEL", default=None,
                        help="the concept shift's moves instead of the lexicon's")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def _move(text: str) -> tuple[str, str]:
    intent, to = text.partition("=")[::2]
    if not intent or not to:
        raise argparse.ArgumentTypeError(f"{text!r} is not INTENT=LABEL")
    return intent, to


def _start_from(settings: Settings, registry: Registry, first: int, say) -> None:
    """The router back to version `first` with nothing learnt since: no priors, no adopted
    traffic, and drift checks that start after the previous run's traffic."""
    stop(settings, demo.MODEL)  # started again by the run
    controller = Controller(settings, demo.MODEL, registry)
    if registry.alias_version(demo.MODEL, CHAMPION) != first:
        controller.rollback(first)
        say(f"{demo.MODEL}: back to v{first}")
    controller.label_shift.clear(first)
    registry.forget_traffic(demo.MODEL, first)
    registry.mark_drift(demo.MODEL, first, None)
    _serving(settings)


def _serving(settings: Settings) -> None:
    """The loop's state back to serving from now: also where an interrupted run left a drift
    being handled or a retrain of its labels under way (its Ray job went with its Ray), which
    the controller `llmops up` starts would go on with (a retrain on the killed run's labels)."""
    store = StateStore(settings.controller_uri)
    state = store.load(demo.MODEL)
    if state is not None:
        store.save(state.model_copy(update={
            "state": "serving", "since": time.time(), "serving_since": time.time(),
            "drift_onset": None, "challenger": None, "retrain_id": None, "detail": {}}))


def _print(rows: list[dict]) -> None:
    for r in rows:
        f1, at = r["macro_f1"], r["seconds_after_drift_onset"]
        print(f"{r['scenario']:14s} {r['labelling']:6s} {r['outcome']:10s} detected "
              f"{at['drift_detected']} s, priors {at['priors_adjusted']} s, challenger "
              f"{at['challenger_registered']} s, serving {at['new_champion_serving']} s; macro-F1 "
              f"clean {f1['clean_traffic_before_drift']}, drifted {f1['drifted_traffic']} "
              f"({f1['recovered']}); {r['retrains']} retrains; {r['labels_used']} labels; "
              f"failed {r['requests_failed']}")


def main() -> None:
    args = _arguments()
    settings = load_settings(args.config, overrides={"data_dir": args.data_dir} if args.data_dir
                             else None)
    if args.moves:
        try:
            reorganise(settings.training.task(demo.MODEL).dataset, dict(args.moves))
        except LLMOpsError as exc:
            sys.exit(f"--moves: {exc}")
    settings.controller.cooldown_s = 0
    drift = settings.monitoring.drift
    settle = drift.window * drift.n if args.settle is None else args.settle
    # lifted: the data dir's earlier runs count against a day's budgets too (each run sends
    # about 10,000 requests as the traffic tenant)
    settings.controller.max_retrains_per_day = 10**6
    settings.serve.quota.tenants[traffic.TENANT] = settings.serve.quota.limits_for(
        traffic.TENANT).model_copy(update={"requests_per_day": None, "tokens_per_day": None})
    settings_args = [x for flag, value in (("--config", args.config),
                                           ("--data-dir", args.data_dir)) if value
                     for x in (flag, value)]

    def say(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    _serving(settings)  # before `llmops up` starts the controller
    demo.prepare(settings, settings_args, say)
    registry = Registry(settings.registry, settings.data_dir)
    first = args.from_version or registry.alias_version(demo.MODEL, CHAMPION)
    runs = [("queue", args.labels)] + ([("random", args.baseline_labels)]
                                       if args.baseline_labels else [])
    rows = []
    for scenario in args.scenarios:
        for labelling, share in runs:
            _start_from(settings, registry, first, say)
            say(f"scenario {scenario}, {share:.0%} labelled ({labelling})")
            rows.append(demo.drift_loop(settings, scenario, say, labels=share,
                                        labelling=labelling, settle=settle,
                                        timeout_s=1800, quality_rows=args.quality_rows))
    stop(settings, demo.MODEL)
    result = {"model": demo.MODEL, "first_champion": first, "scenarios": rows,
              **({"concept_moves": dict(args.moves)} if args.moves else {})}
    if args.json:
        print(json.dumps(result))
    else:
        _print(rows)


if __name__ == "__main__":
    main()
