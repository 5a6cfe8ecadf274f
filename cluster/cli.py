"""`llmops`: the platform's command line (parsing; what each command does: `cluster/commands.py`,
`cluster/governance_commands.py`).
Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import sys

from cluster import commands, governance_commands, runtime
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


class _Commands:
    """Adds subcommands to one level of the parser: each takes the global options (--config,
    --data-dir, --mlflow-uri, --debug) and, unless said, `--json`."""

    def __init__(self, sub, common: argparse.ArgumentParser):
        self.sub, self.common = sub, common

    def add(self, name: str, func, help: str, json: bool = True) -> argparse.ArgumentParser:
        parser = self.sub.add_parser(name, parents=[self.common], help=help)
        if json:
            parser.add_argument("--json", action="store_true")
        parser.set_defaults(func=func)
        return parser

    def group(self, name: str, help: str) -> _Commands:
        """A command with subcommands of its own (`llmops audit verify`)."""
        sub = self.sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command",
                                                                  required=True)
        return _Commands(sub, self.common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    _global_options(parser, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    cmds = _Commands(parser.add_subparsers(dest="command", required=True), common)
    for add in (_data_and_training, _platform, _cluster, _loop, _governance, _monitoring):
        add(cmds)
    return parser


def _data_and_training(cmds: _Commands) -> None:
    data = cmds.group("data", "seeded datasets with drift scenarios")
    gen = data.add("generate", commands.cmd_data_generate, "write a dataset to a file",
                   json=False)
    gen.add_argument("task", help="support-tickets or moderation")
    gen.add_argument("--scenario", default="base")
    gen.add_argument("--n", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--fraction", type=float, default=1.0,
                     help="share of rows drawn from the scenario, the rest from base")
    gen.add_argument("--out", required=True, help="path ending in .parquet or .jsonl")
    data.add("scenarios", commands.cmd_data_scenarios, "list the drift scenarios", json=False)

    train = cmds.add("train", commands.cmd_train, "fine-tune and register a model")
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
    distill = cmds.add("distill", commands.cmd_distill, "train a smaller student of a "
                       "champion: its peak fallback (alias fallback)")
    distill.add_argument("task", help="a task with a champion (not one of LoRA adapters)")
    distill.add_argument("--workers", type=int)
    tune = cmds.add("tune", commands.cmd_tune, "search learning rate and epochs")
    tune.add_argument("task")
    tune.add_argument("--trials", type=int)
    cmds.add("models", commands.cmd_models, "registered models and aliases")
    lineage = cmds.add("lineage", commands.cmd_lineage, "a model version's chain from data to "
                       "deployment to served requests (OpenLineage events)")
    lineage.add_argument("model", help="MODEL@VERSION or MODEL@ALIAS")


def _platform(cmds: _Commands) -> None:
    up = cmds.add("up", commands.cmd_up, "start Ray (if needed) and deploy the apps")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING")
    cmds.add("status", commands.cmd_status, "applications, replicas, versions")
    cmds.add("down", commands.cmd_down, "remove the apps, stop the loop's actors; stop Ray if "
             "`up` started it")
    swap = cmds.add("swap", commands.cmd_swap, "hot-swap the version a model serves")
    swap.add_argument("model")
    which = swap.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int)
    which.add_argument("--alias")
    canary = cmds.add("canary", commands.cmd_canary,
                      "serve a challenger beside the champion (or shadow it)")
    canary.add_argument("model")
    canary.add_argument("--version", type=int)
    canary.add_argument("--alias")
    canary.add_argument("--fraction", type=float, help="share of request ids (default: "
                        "CanaryConfig's)")
    canary.add_argument("--shadow", action="store_true", help="mirror instead of answering")
    canary.add_argument("--off", action="store_true", help="end the canary")
    cmds.add("serve-config", commands.cmd_serve_config, "print the generated Serve config",
             json=False)
    traffic = cmds.add("traffic", commands.cmd_traffic,
                       "send seeded traffic of a scenario to a running pipeline")
    traffic.add_argument("app", help="support, moderation or chat")
    traffic.add_argument("--model", help="chat: the generator asked (default: chat's own); "
                         "support: its reply generator, whose replies are then corrected "
                         "instead of the router's answers labelled. Its answers get their "
                         "reference texts as corrections")
    traffic.add_argument("--scenario", default="base")
    traffic.add_argument("--n", type=int, default=500, help="requests (one text each)")
    traffic.add_argument("--fraction", type=float, default=1.0,
                         help="share drawn from the scenario, the rest from base")
    traffic.add_argument("--seed", type=int, default=0)
    traffic.add_argument("--concurrency", type=int, default=8)
    traffic.add_argument("--feedback", type=float, default=0.0, metavar="SHARE",
                         help="share of answered requests to label with the true label")
    traffic.add_argument("--labelling", choices=["queue", "random"], default="queue",
                         help="which answers get labels (chat: corrections): the platform's "
                              "queue of pending labels (most useful first) or a seeded random "
                              "draw")


def _cluster(cmds: _Commands) -> None:
    check = cmds.group("cluster", "a multi-node cluster's config (`ray up`)").add(
        "check", commands.cmd_cluster_check, "check that every replica and fine-tune worker the "
        "settings ask for fits some node type of the cluster config (exit 2 if not)")
    check.add_argument("--cluster-config", default="cluster.yaml", metavar="FILE")
    kuberay = cmds.add("kuberay", commands.cmd_kuberay, "write the KubeRay RayService and RayJob "
                       "manifests generated from cluster.yaml and the cluster settings "
                       "(--config, default cluster/config/llmops.yaml)")
    kuberay.add_argument("--cluster-config", default="cluster.yaml", metavar="FILE")
    kuberay.add_argument("--out", default="cluster/kuberay", metavar="DIR")
    kuberay.add_argument("--task", action="append", default=None,
                         help="a task to write a fine-tune RayJob for (repeatable; "
                         "default support-router)")


def _loop(cmds: _Commands) -> None:
    ctl = cmds.add("controller", commands.cmd_controller, "the closed loop per model: drift -> "
                   "retrain -> gate -> canary -> promotion")
    ctl.add_argument("action", choices=["start", "stop", "status", "step"],
                     help="start/stop the detached controller actors on the cluster, show their "
                     "state and transitions, or run one step here")
    ctl.add_argument("models", nargs="*", help="default: controller.models in the settings")
    ctl.add_argument("--events", type=int, default=10, help="transitions shown per model")
    cmds.add("promote", commands.manual("promote"),
             "make the challenger (or the canary) the champion now").add_argument("model")
    rollback = cmds.add("rollback", commands.manual("rollback", "to_version"),
                        "end a canary, or make an earlier version the champion again")
    rollback.add_argument("model")
    rollback.add_argument("--to-version", type=int, help="default: the previous champion")
    retrain = cmds.add("retrain", commands.manual("retrain_now"), "retrain on labelled recent "
                       "traffic now, without waiting for drift (the gate and the canary still "
                       "apply)")
    retrain.add_argument("model")
    retrain.add_argument("--now", action="store_true", required=True)
    demo = cmds.add("demo", commands.cmd_demo, "the whole loop on this machine: train, serve, "
                    "drift, retrain, gate, canary, promote")
    demo.add_argument("--scenario", default="new-product", help="the drift to mix in")
    demo.add_argument("--model", default="support-router", help="the model whose loop runs: "
                      "the support router (support traffic, labels), or a generator: rewriter "
                      "(chat traffic, corrected answers) or support-reply (support traffic, "
                      "corrected replies)")
    demo.add_argument("--teardown", action="store_true", help="stop everything at the end")
    demo.add_argument("--canary-fraction", type=float, default=0.5, help="the demo's canary "
                      "answers this share (one or two bursts of traffic judge it); the "
                      "settings' own: controller.canary.fraction")
    demo.add_argument("--deepspeed-stage", type=int, choices=[0, 1, 2, 3],
                      help="ZeRO stage of the demo's fine-tunes; default: 0 off GPUs (12%% "
                      "faster on CPU than 2, bench/train.py), else the settings'")


def _governance(cmds: _Commands) -> None:
    create = cmds.group("token", "development bearer tokens (JWT)").add(
        "create", governance_commands.cmd_token_create, "print a token signed with the local secret "
        "(<data_dir>/auth/jwt_secret, made if absent)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", nargs="+", required=True,
                        help="moderate, support, chat, feedback, advise, admin")
    create.add_argument("--subject", help="the principal (default <tenant>-dev)")
    create.add_argument("--ttl", type=int, help="seconds the token is valid (default "
                        "serve.auth.default_ttl_s)")
    dev = cmds.group("tls", "HTTPS certificates").add(
        "dev-cert", governance_commands.cmd_tls_dev_cert, "make a local CA and a server certificate it "
        "signs; prints the serve.tls settings that use them")
    dev.add_argument("--out", help="folder for ca.pem, server.pem, server-key.pem (default "
                     "<data_dir>/tls)")
    dev.add_argument("--host", action="append", default=[], help="a name or IP address the "
                     "certificate is for, besides localhost and loopback (repeatable)")
    dev.add_argument("--days", type=int, default=90, help="validity (default 90)")
    audit = cmds.group("audit", "the hash-chained audit log of every inference")
    audit.add("verify", governance_commands.cmd_audit_verify,
              "check the chain; exit 1 and name the first bad line")
    export = audit.add("export", governance_commands.cmd_audit_export,
                       "print the records (JSON lines) for a log shipper", json=False)
    export.add_argument("--since", help="ISO 8601 time, inclusive (UTC unless it says)")
    export.add_argument("--until", help="ISO 8601 time, exclusive")
    audit.add("replay", governance_commands.cmd_audit_replay, "run an answer's recorded tool calls "
              "(simulations) again; exit 1 if a figure differs").add_argument(
        "request_id", metavar="REQUEST_ID")


def _monitoring(cmds: _Commands) -> None:
    check = cmds.group("drift", "drift of served traffic against the training data").add(
        "check", commands.cmd_drift_check, "check a model's logged traffic once (`!` marks a "
        "metric over its threshold)")
    check.add_argument("model", help="a served classifier, e.g. support-router")
    check.add_argument("--window", type=int, help="requests per window (default from settings)")
    monitor = cmds.add("monitor", commands.cmd_monitor,
                       "check drift on a schedule and serve Prometheus metrics")
    monitor.add_argument("--once", action="store_true",
                         help="one round of checks; print the metrics and exit")
    health = cmds.add("healthcheck", commands.cmd_healthcheck, "measure each champion on its "
                      "golden set against its registration; exit 1 when degraded")
    health.add_argument("models", nargs="*", help="registered models (default: every champion)")
    health.add_argument("--textfile", help="Prometheus textfile to write (default "
                        "<data_dir>/metrics/healthcheck.prom, served by `llmops monitor`)")
    health.add_argument("--pushgateway", metavar="URL", help="also push to a Pushgateway")


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
