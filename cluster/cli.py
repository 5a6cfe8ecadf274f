"""`llmops`: the platform's command line (parsing; each command is `cluster/commands.py`).
Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import sys

from cluster import commands, runtime
from training.errors import LLMOpsError


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--config", default=default, help="settings file (default ./llmops.yaml)")
    parser.add_argument("--data-dir", default=default, help="where state lives (default .llmops)")
    parser.add_argument("--mlflow-uri", default=default, help="MLflow tracking URI")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks of internal errors")


def _tag(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


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
    gen.set_defaults(func=commands.cmd_data_generate)
    data_sub.add_parser("scenarios", parents=[common],
                        help="list the drift scenarios").set_defaults(func=commands.cmd_data_scenarios)

    train = sub.add_parser("train", parents=[common], help="fine-tune and register a model")
    train.add_argument("task", nargs="+", help="tasks of training.tasks: support-router, "
                       "moderation, rewriter, support-reply, advisor-intent or your own; "
                       "several train one after another in this one process")
    train.add_argument("--scenario", default="base", help="data distribution to train on")
    train.add_argument("--workers", type=int)
    train.add_argument("--deepspeed-stage", type=int, choices=[0, 1, 2, 3])
    train.add_argument("--epochs", type=int)
    train.add_argument("--resume", metavar="RUN", help="continue a killed run from its checkpoint")
    train.add_argument("--data", metavar="DIR", help="train on a saved TaskData folder (what the "
                       "controller's retrain writes) instead of generated data")
    train.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE",
                       help="tag the MLflow run (repeatable)")
    train.add_argument("--json", action="store_true")
    train.set_defaults(func=commands.cmd_train)

    distill = sub.add_parser("distill", parents=[common], help="train a smaller student of a "
                             "classifier's champion: its peak fallback (alias fallback)")
    distill.add_argument("task", help="a classification task with a champion")
    distill.add_argument("--workers", type=int)
    distill.add_argument("--json", action="store_true")
    distill.set_defaults(func=commands.cmd_distill)

    tune = sub.add_parser("tune", parents=[common], help="search learning rate and epochs")
    tune.add_argument("task")
    tune.add_argument("--trials", type=int)
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=commands.cmd_tune)

    models = sub.add_parser("models", parents=[common], help="registered models and aliases")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=commands.cmd_models)

    lineage = sub.add_parser("lineage", parents=[common], help="a model version's chain from "
                             "data to deployment to served requests (OpenLineage events)")
    lineage.add_argument("model", help="MODEL@VERSION or MODEL@ALIAS")
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(func=commands.cmd_lineage)

    up = sub.add_parser("up", parents=[common], help="start Ray (if needed) and deploy the apps")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=commands.cmd_up)
    status = sub.add_parser("status", parents=[common], help="applications, replicas, versions")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=commands.cmd_status)
    down = sub.add_parser("down", parents=[common], help="remove the apps, stop the loop's "
                          "actors; stop Ray if `up` started it")
    down.add_argument("--json", action="store_true")
    down.set_defaults(func=commands.cmd_down)
    swap = sub.add_parser("swap", parents=[common], help="hot-swap the version a model serves")
    swap.add_argument("model")
    which = swap.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int)
    which.add_argument("--alias")
    swap.add_argument("--json", action="store_true")
    swap.set_defaults(func=commands.cmd_swap)
    canary = sub.add_parser("canary", parents=[common],
                            help="serve a challenger beside the champion (or shadow it)")
    canary.add_argument("model")
    canary.add_argument("--version", type=int)
    canary.add_argument("--alias")
    canary.add_argument("--fraction", type=float, help="share of request ids (default: "
                        "CanaryConfig's)")
    canary.add_argument("--shadow", action="store_true", help="mirror instead of answering")
    canary.add_argument("--off", action="store_true", help="end the canary")
    canary.add_argument("--json", action="store_true")
    canary.set_defaults(func=commands.cmd_canary)
    sub.add_parser("serve-config", parents=[common], help="print the generated Serve config"
                   ).set_defaults(func=commands.cmd_serve_config)

    cluster = sub.add_parser("cluster", help="a multi-node cluster's config (`ray up`)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    ccheck = cluster_sub.add_parser(
        "check", parents=[common], help="check that every replica and fine-tune worker the "
        "settings ask for fits some node type of the cluster config (exit 2 if not)")
    ccheck.add_argument("--cluster-config", default="cluster.yaml", metavar="FILE")
    ccheck.add_argument("--json", action="store_true")
    ccheck.set_defaults(func=commands.cmd_cluster_check)
    kuberay = sub.add_parser("kuberay", parents=[common],
                             help="write the KubeRay RayService and RayJob manifests generated "
                             "from cluster.yaml and the cluster settings (--config, default "
                             "cluster/config/llmops.yaml)")
    kuberay.add_argument("--cluster-config", default="cluster.yaml", metavar="FILE")
    kuberay.add_argument("--out", default="cluster/kuberay", metavar="DIR")
    kuberay.add_argument("--task", action="append", default=None,
                         help="a task to write a fine-tune RayJob for (repeatable; "
                         "default support-router)")
    kuberay.add_argument("--json", action="store_true")
    kuberay.set_defaults(func=commands.cmd_kuberay)

    traffic = sub.add_parser("traffic", parents=[common],
                             help="send seeded traffic of a scenario to a running pipeline")
    traffic.add_argument("app", help="support or moderation")
    traffic.add_argument("--scenario", default="base")
    traffic.add_argument("--n", type=int, default=500, help="requests (one text each)")
    traffic.add_argument("--fraction", type=float, default=1.0,
                         help="share drawn from the scenario, the rest from base")
    traffic.add_argument("--seed", type=int, default=0)
    traffic.add_argument("--concurrency", type=int, default=8)
    traffic.add_argument("--feedback", type=float, default=0.0, metavar="SHARE",
                         help="share of answered requests to label with the true label")
    traffic.add_argument("--labelling", choices=["queue", "random"], default="queue",
                         help="which answers get labels: the platform's queue of pending "
                              "labels (most useful first) or a seeded random draw")
    traffic.add_argument("--json", action="store_true")
    traffic.set_defaults(func=commands.cmd_traffic)

    drift = sub.add_parser("drift", help="drift of served traffic against the training data")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    check = drift_sub.add_parser("check", parents=[common],
                                 help="check a model's logged traffic once (`!` marks a metric "
                                 "over its threshold)")
    check.add_argument("model", help="a served classifier, e.g. support-router")
    check.add_argument("--window", type=int, help="requests per window (default from settings)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=commands.cmd_drift_check)

    token = sub.add_parser("token", help="development bearer tokens (JWT)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[common], help="print a token signed with "
                                  "the local secret (<data_dir>/auth/jwt_secret, made if absent)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", nargs="+", required=True,
                        help="moderate, support, chat, feedback, advise, admin")
    create.add_argument("--subject", help="the principal (default <tenant>-dev)")
    create.add_argument("--ttl", type=int, help="seconds the token is valid (default "
                        "serve.auth.default_ttl_s)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=commands.cmd_token_create)

    tls = sub.add_parser("tls", help="HTTPS certificates")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True)
    dev = tls_sub.add_parser("dev-cert", parents=[common], help="make a local CA and a server "
                             "certificate it signs; prints the serve.tls settings that use them")
    dev.add_argument("--out", help="folder for ca.pem, server.pem, server-key.pem (default "
                     "<data_dir>/tls)")
    dev.add_argument("--host", action="append", default=[], help="a name or IP address the "
                     "certificate is for, besides localhost and loopback (repeatable)")
    dev.add_argument("--days", type=int, default=90, help="validity (default 90)")
    dev.add_argument("--json", action="store_true")
    dev.set_defaults(func=commands.cmd_tls_dev_cert)

    audit = sub.add_parser("audit", help="the hash-chained audit log of every inference")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", parents=[common],
                                  help="check the chain; exit 1 and name the first bad line")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=commands.cmd_audit_verify)
    export = audit_sub.add_parser("export", parents=[common],
                                  help="print the records (JSON lines) for a log shipper")
    export.add_argument("--since", help="ISO 8601 time, inclusive (UTC unless it says)")
    export.add_argument("--until", help="ISO 8601 time, exclusive")
    export.set_defaults(func=commands.cmd_audit_export)
    replay = audit_sub.add_parser("replay", parents=[common], help="run an answer's recorded "
                                  "tool calls (simulations) again; exit 1 if a figure differs")
    replay.add_argument("request_id", metavar="REQUEST_ID")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=commands.cmd_audit_replay)

    ctl = sub.add_parser("controller", parents=[common],
                         help="the closed loop per model: drift -> retrain -> gate -> canary -> "
                         "promotion")
    ctl.add_argument("action", choices=["start", "stop", "status", "step"],
                     help="start/stop the detached controller actors on the cluster, show their "
                     "state and transitions, or run one step here")
    ctl.add_argument("models", nargs="*", help="default: controller.models in the settings")
    ctl.add_argument("--events", type=int, default=10, help="transitions shown per model")
    ctl.add_argument("--json", action="store_true")
    ctl.set_defaults(func=commands.cmd_controller)
    promote = sub.add_parser("promote", parents=[common],
                             help="make the challenger (or the canary) the champion now")
    promote.add_argument("model")
    promote.add_argument("--json", action="store_true")
    promote.set_defaults(func=commands.manual("promote"))
    rollback = sub.add_parser("rollback", parents=[common],
                              help="end a canary, or make an earlier version the champion again")
    rollback.add_argument("model")
    rollback.add_argument("--to-version", type=int, help="default: the previous champion")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(func=commands.manual("rollback", "to_version"))
    retrain = sub.add_parser("retrain", parents=[common],
                             help="retrain on labelled recent traffic now, without waiting for "
                             "drift (the gate and the canary still apply)")
    retrain.add_argument("model")
    retrain.add_argument("--now", action="store_true", required=True)
    retrain.add_argument("--json", action="store_true")
    retrain.set_defaults(func=commands.manual("retrain_now"))

    demo = sub.add_parser("demo", parents=[common],
                          help="the whole loop on this machine: train, serve, drift, retrain, "
                          "gate, canary, promote")
    demo.add_argument("--scenario", default="new-product", help="the drift to mix in")
    demo.add_argument("--teardown", action="store_true", help="stop everything at the end")
    demo.add_argument("--canary-fraction", type=float, default=0.5, help="the demo's canary "
                      "answers this share (one or two bursts of traffic judge it); the "
                      "settings' own: controller.canary.fraction")
    demo.add_argument("--deepspeed-stage", type=int, choices=[0, 1, 2, 3],
                      help="ZeRO stage of the demo's fine-tunes; default: 0 off GPUs (12%% "
                      "faster on CPU than 2, bench/train.py), else the settings'")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=commands.cmd_demo)

    monitor = sub.add_parser("monitor", parents=[common],
                             help="check drift on a schedule and serve Prometheus metrics")
    monitor.add_argument("--once", action="store_true",
                         help="one round of checks; print the metrics and exit")
    monitor.add_argument("--json", action="store_true")
    monitor.set_defaults(func=commands.cmd_monitor)

    health = sub.add_parser("healthcheck", parents=[common],
                            help="measure each champion on its golden set against its "
                            "registration; exit 1 when degraded")
    health.add_argument("models", nargs="*", help="registered models (default: every champion)")
    health.add_argument("--textfile", help="Prometheus textfile to write (default "
                        "<data_dir>/metrics/healthcheck.prom, served by `llmops monitor`)")
    health.add_argument("--pushgateway", metavar="URL", help="also push to a Pushgateway")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=commands.cmd_healthcheck)
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
            return output.exit_code
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
