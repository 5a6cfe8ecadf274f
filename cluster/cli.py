"""`llmops`: the platform's command line. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from cluster import runtime
from cluster.settings import Settings, load_settings
from training.errors import LLMOpsError


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--config", default=default, help="settings file (default ./llmops.yaml)")
    parser.add_argument("--data-dir", default=default, help="where state lives (default .llmops)")
    parser.add_argument("--mlflow-uri", default=default, help="MLflow tracking URI")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks of internal errors")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "mlflow_uri", None):
        overrides["registry"] = {"tracking_uri": args.mlflow_uri}
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _registry(settings: Settings):
    from training.registry import Registry

    return Registry(settings.registry, settings.data_dir)


@dataclass
class Output:
    """What a command reports: printed as JSON with --json, else as human-readable text."""

    payload: dict
    human: Callable[[dict], str]

    def render(self, as_json: bool) -> str:
        return json.dumps(self.payload, default=str) if as_json else self.human(self.payload)


def cmd_data_generate(args) -> None:
    from training import data

    df = data.generate(args.task, args.scenario, args.n, args.seed, args.fraction)
    path = data.write(df, args.out)
    print(f"wrote {path}: {args.task}/{args.scenario} seed {args.seed}, {data.summarize(df)}")


def cmd_data_scenarios(args) -> None:
    from training.data import SCENARIOS

    for s in SCENARIOS.values():
        print(f"{s.name:14} {s.description}")


def _format_job(result: dict) -> str:
    lines = [f"registered {result['model']} version {result['version']} as @{result['alias']} "
             f"(run {result['run_id']}, {result['seconds']} s)"]
    for holdout, metrics in result["metrics"].items():
        shown = {k: v for k, v in metrics.items() if k in ("macro_f1", "accuracy", "ece",
                                                            "loss", "perplexity")}
        lines.append(f"  {holdout:14} " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return "\n".join(lines)


def cmd_train(args) -> Output:
    from training.job import build_task_data, fit_and_register, task_config, with_overrides

    settings = _settings(args)
    config = with_overrides(settings.training, args.task, workers=args.workers,
                            deepspeed_stage=args.deepspeed_stage, epochs=args.epochs)
    task_config(config, args.task)
    data = build_task_data(config, args.task, args.scenario)
    registry = _registry(settings)
    registry.check()
    runtime.connect(settings.ray)
    result = fit_and_register(config, registry, args.task, data,
                              storage_path=settings.storage_path,
                              use_gpu=runtime.use_gpu(config.use_gpu), resume=args.resume)
    return Output(result.to_dict(), _format_job)


def cmd_tune(args) -> Output:
    from training.tune import tune_task

    settings = _settings(args)
    tune = settings.tune if args.trials is None else settings.tune.model_copy(
        update={"trials": args.trials})
    registry = _registry(settings)
    registry.check()
    runtime.connect(settings.ray)
    result = tune_task(settings.training, tune, registry, args.task,
                       storage_path=settings.storage_path,
                       use_gpu=runtime.use_gpu(settings.training.use_gpu))
    return Output(result.to_dict(), _format_job)


def cmd_models(args) -> Output:
    settings = _settings(args)
    registry = _registry(settings)
    registry.check()
    models = registry.models()

    def human(payload: dict) -> str:
        lines = []
        for m in payload["models"]:
            lines.append(m["name"])
            for v in m["versions"]:
                tag = ",".join("@" + a for a in v["aliases"]) or "-"
                shown = " ".join(f"{k} {x:.3f}" for k, x in sorted(v["metrics"].items())[:4])
                lines.append(f"  v{v['version']:<3} {tag:22} {shown}")
        return "\n".join(lines) or "no registered models"

    return Output({"models": models}, human)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    _global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="seeded datasets with drift scenarios")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    gen = data_sub.add_parser("generate", parents=[common], help="write a dataset to a file")
    gen.add_argument("task", help="support-tickets or moderation")
    gen.add_argument("--scenario", default="base")
    gen.add_argument("--n", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fraction", type=float, default=1.0,
                     help="share of rows drawn from the scenario, the rest from base")
    gen.add_argument("--out", required=True, help="path ending in .parquet or .jsonl")
    gen.set_defaults(func=cmd_data_generate)
    data_sub.add_parser("scenarios", parents=[common],
                        help="list the drift scenarios").set_defaults(func=cmd_data_scenarios)

    train = sub.add_parser("train", parents=[common], help="fine-tune and register a model")
    train.add_argument("task", help="support-router, moderation or rewriter")
    train.add_argument("--scenario", default="base", help="data distribution to train on")
    train.add_argument("--workers", type=int)
    train.add_argument("--deepspeed-stage", type=int, choices=[0, 1, 2, 3])
    train.add_argument("--epochs", type=int)
    train.add_argument("--resume", metavar="RUN", help="continue a killed run from its checkpoint")
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", parents=[common], help="search learning rate and epochs")
    tune.add_argument("task")
    tune.add_argument("--trials", type=int)
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=cmd_tune)

    models = sub.add_parser("models", parents=[common], help="registered models and aliases")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    runtime.apply_platform_env()
    args = build_parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    # With --json, stdout carries exactly one JSON object: Ray's and the libraries' output goes
    # to stderr until Ray has shut down.
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            try:
                output = args.func(args)
            finally:
                runtime.disconnect()
        if output is not None:
            print(output.render(as_json), flush=True)
    except LLMOpsError as exc:
        print(f"llmops: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the user unless asked
        if args.debug:
            raise
        print(f"llmops: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
