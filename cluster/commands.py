"""What each `llmops` command does: load the settings, call the library, return an `Output`
(the payload, and how to print it for a person: `cluster/views.py`). Parsing is
`cluster/cli.py`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster import platform, runtime, views
from cluster.settings import Settings, load_settings
from training.errors import LLMOpsError


def settings_of(args: argparse.Namespace) -> Settings:
    overrides: dict = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    if getattr(args, "mlflow_uri", None):
        overrides["registry"] = {"tracking_uri": args.mlflow_uri}
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _registry(settings: Settings):
    """The platform's registry, checked reachable (before any slow work)."""
    from training.registry import Registry

    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    return registry


@dataclass
class Output:
    """What a command reports: printed as JSON with --json, else as human-readable text."""

    payload: dict
    human: Callable[[dict], str]
    exit_code: int = 0

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


def cmd_train(args) -> Output:
    from training.taskdata import TaskData, build_task_data

    settings = settings_of(args)  # names, data and the registry are checked before the slow imports
    if len(args.task) > 1 and (args.data or args.resume):
        raise LLMOpsError("--data and --resume name one task's data or run: train one task")
    configs = {task: settings.training.overridden(task, workers=args.workers,
                                                  deepspeed_stage=args.deepspeed_stage,
                                                  epochs=args.epochs) for task in args.task}
    data = {task: TaskData.load(Path(args.data)) if args.data else
            build_task_data(config, task, args.scenario) for task, config in configs.items()}
    tags = dict(t.split("=", 1) for t in args.tag)
    registry = _registry(settings)
    from training.job import fit_and_register

    runtime.connect(settings.ray, settings.monitoring.logging)
    results = [fit_and_register(config, registry, task, data[task],
                                storage_path=settings.storage_path,
                                use_gpu=runtime.use_gpu(config.use_gpu), resume=args.resume,
                                tags=tags).to_dict() for task, config in configs.items()]
    if len(results) == 1:
        return Output(results[0], views.job)
    return Output({"jobs": results}, lambda p: "\n".join(views.job(j) for j in p["jobs"]))


def cmd_distill(args) -> Output:
    settings = settings_of(args)
    config = settings.training.overridden(args.task, workers=args.workers)
    registry = _registry(settings)
    from training.distill import distill_and_register

    runtime.connect(settings.ray, settings.monitoring.logging)
    result = distill_and_register(config, registry, args.task,
                                  storage_path=settings.storage_path,
                                  use_gpu=runtime.use_gpu(config.use_gpu))
    return Output(result.to_dict(), views.distilled, exit_code=0 if result.gate.promote else 1)


def cmd_tune(args) -> Output:
    from training.tune import tune_task

    settings = settings_of(args)
    tune = settings.tune if args.trials is None else settings.tune.model_copy(
        update={"trials": args.trials})
    registry = _registry(settings)
    runtime.connect(settings.ray, settings.monitoring.logging)
    result = tune_task(settings.training, tune, registry, args.task,
                       storage_path=settings.storage_path,
                       use_gpu=runtime.use_gpu(settings.training.use_gpu))
    return Output(result.to_dict(), views.job)


def cmd_models(args) -> Output:
    from training.registry import Registry

    settings = settings_of(args)  # the catalogue is read without the MLflow client where it can be
    return Output({"models": Registry(settings.registry, settings.data_dir).models()},
                  views.models)


def cmd_lineage(args) -> Output:
    from monitoring.log import read
    from training.lineage import chain
    from training.refs import model_name, pin, reference

    settings = settings_of(args)
    registry = _registry(settings)
    name, _, at = args.model.removeprefix("models:/").replace("/", "@", 1).partition("@")
    if not name or not at:
        raise LLMOpsError(f"name a model version as MODEL@VERSION or MODEL@ALIAS, not "
                          f"{args.model!r}")
    ref = pin(reference(name, int(at)) if at.isdigit() else reference(name, alias=at),
              registry.tracking_uri)[0]
    out = chain(registry.lineage.events(), ref)
    served = read(settings.log_uri, model=model_name(ref), model_version=ref.rsplit("/", 1)[1])
    out["served"] = {"requests": len(served), "log": settings.log_uri,
                     "first": str(served.ts.min()) if len(served) else None,
                     "last": str(served.ts.max()) if len(served) else None}
    return Output(out, views.lineage)


def cmd_traffic(args) -> Output:
    from cluster.traffic import generator_target, judged, send, token
    from serve_apps.tls import client_context

    settings = settings_of(args)
    app = getattr(settings.serve, args.app, None)
    prefix = app.route_prefix if app is not None else ""
    asked = generator_target(settings, args.app, args.model) \
        if args.app == "chat" or args.model else None
    report = send(settings.serve.url, args.app, prefix, args.scenario, args.n, args.seed,
                  args.fraction, args.concurrency, args.feedback,
                  settings.serve.feedback.route_prefix, token(settings),
                  client_context(settings.serve.tls), args.labelling, asked,
                  judged(settings, args.app, asked))
    return Output(report, lambda p: (f"{p['requests']} requests ({p['scenario']}) to {p['url']}: "
                                     f"{p['ok']} ok, {p['failed']} failed, {p['rps']} req/s, "
                                     f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms; "
                                     f"{p['feedback']['accepted']} labels given"))


def cmd_drift_check(args) -> Output:
    from monitoring.drift import check_model

    settings = settings_of(args)
    registry = _registry(settings)
    decision = check_model(settings.log_uri, registry, settings.monitoring.drift, args.model,
                           window=args.window, report_dir=settings.data_dir.resolve() / "drift")

    return Output(decision.to_dict(), views.drift)


def cmd_monitor(args) -> Output | None:
    from monitoring.monitor import Monitor

    settings = settings_of(args)
    monitor = Monitor(_registry(settings), settings.log_uri, settings.monitoring,
                      settings.metrics_dir)
    if args.once:
        decisions = monitor.tick()
        return Output({"decisions": {m: d and d.to_dict() for m, d in decisions.items()},
                       "metrics": monitor.text()}, lambda p: p["metrics"].rstrip())
    runtime.log_here(settings.monitoring.logging)  # as the monitor actor does: JSON by default
    monitor.serve()  # until Ctrl-C
    return None


def _answers(pushgateway: str) -> None:
    """A pushgateway that does not accept connections is named at once, not after every
    champion has been measured."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(pushgateway if "://" in pushgateway else f"http://{pushgateway}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=5).close()
    except (OSError, ValueError) as exc:
        raise LLMOpsError(f"cannot push to {pushgateway}: {exc}") from exc


def cmd_healthcheck(args) -> Output:
    import time

    from monitoring.health import check_champions
    from monitoring.metrics import health_families, registry_of, write_textfile

    settings = settings_of(args)
    if args.pushgateway:
        _answers(args.pushgateway)
    results = check_champions(_registry(settings), settings.monitoring.health, args.models or None)
    metrics = registry_of(lambda: health_families(results, time.time()))
    textfile = Path(args.textfile) if args.textfile else settings.metrics_dir / "healthcheck.prom"
    write_textfile(metrics, textfile)
    if args.pushgateway:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(args.pushgateway, job="llmops_healthcheck", registry=metrics)
        except OSError as exc:
            raise LLMOpsError(f"cannot push to {args.pushgateway}: {exc}") from exc
    healthy = all(r.healthy for r in results)

    return Output({"healthy": healthy, "results": [r.to_dict() for r in results],
                   "textfile": str(textfile)}, views.health, exit_code=0 if healthy else 1)


def cmd_controller(args) -> Output:
    from cluster.loop import actor, control, statuses, stop
    from monitoring.singleton import NAMESPACE

    settings = settings_of(args)
    models = args.models or settings.controller.models
    if args.action == "status":  # read-only: the store and the dashboard, no Ray driver
        out = statuses(settings, models, args.events)
    else:
        out = {}
        for model in models:
            if args.action == "start":
                actor(settings, model, start=True)
            elif args.action == "stop":
                stop(settings, model)
            else:
                control(settings, model, "step")
            out[model] = {"running": actor(settings, model) is not None,
                          "namespace": NAMESPACE, "state": control(settings, model, "state"),
                          "events": control(settings, model, "events")[-args.events:]}

    return Output(out, views.controllers)


def cmd_demo(args) -> Output:
    from cluster import demo

    settings = settings_of(args)
    if not 0 < args.canary_fraction <= 1:
        raise LLMOpsError("--canary-fraction must be in (0, 1]")
    settings.controller.canary.fraction = args.canary_fraction
    if args.deepspeed_stage is not None:
        settings.training.deepspeed.stage = args.deepspeed_stage
    elif not runtime.wants_gpu(settings.training.use_gpu, demo.local_gpus()):
        settings.training.deepspeed.stage = 0
    passed = [(flag, getattr(args, name, None)) for flag, name in (
        ("--config", "config"), ("--data-dir", "data_dir"), ("--mlflow-uri", "mlflow_uri"))]
    summary = demo.run(settings, [x for flag, value in passed if value for x in (flag, value)],
                       args.scenario, args.teardown, lambda text: print(text, flush=True),
                       model=args.model)

    return Output(summary, views.demo, exit_code=0 if summary["requests_failed"] == 0 else 1)


def manual(method: str, *args_of: str):
    def command(args) -> Output:
        from cluster.loop import control

        settings = settings_of(args)
        state = control(settings, args.model, method, *(getattr(args, a) for a in args_of))
        return Output(state, views.state)
    return command


def cmd_up(args) -> Output:
    return Output(platform.up(settings_of(args), args.timeout), views.status)


def cmd_status(args) -> Output:
    return Output(platform.status(settings_of(args)), views.status)


def cmd_down(args) -> Output:
    return Output(platform.down(settings_of(args)), views.down)


def cmd_swap(args) -> Output:
    from serve_apps.deploy import swap

    settings = settings_of(args)
    registry = _registry(settings)
    result = swap(platform.serve_cluster(settings), args.model, registry.tracking_uri,
                  version=args.version, alias=args.alias)
    registry.lineage.deployed(registry.tracking_uri, result["serving"], result["deployments"],
                              f"llmops swap to {result['serving']}")
    return Output(result, views.change)


def cmd_canary(args) -> Output:
    from pydantic import ValidationError

    from serve_apps.deploy import set_canary
    from serve_apps.model_config import CanaryConfig
    from training.refs import reference

    settings = settings_of(args)
    registry = _registry(settings)
    canary = None
    if not args.off:
        if (args.version is None) == (args.alias is None):
            raise LLMOpsError("give --version N or --alias A (or --off)")
        ref = reference(args.model, args.version, args.alias)
        try:
            canary = CanaryConfig(model=ref, shadow=args.shadow,
                                  **({} if args.fraction is None else {"fraction": args.fraction}))
        except ValidationError as exc:
            raise LLMOpsError(f"--fraction: {exc.errors()[0]['msg']}") from None
    result = set_canary(platform.serve_cluster(settings), args.model, registry.tracking_uri, canary)
    return Output(result, views.change)


def cmd_serve_config(args) -> None:
    import yaml

    settings = settings_of(args)
    registry = _registry(settings)
    try:  # `auto` is read as `llmops up` reads it: the running cluster's GPUs
        gpus = runtime.cluster_gpus(settings.ray.address) if settings.serve.use_gpu == "auto" else 0
    except ConnectionError:  # none runs: as on a cluster without GPUs
        gpus = 0
    print(yaml.safe_dump(platform.generated_serve_config(settings, registry, gpus), sort_keys=False))


def cmd_cluster_check(args) -> Output:
    from cluster.capacity import check, load_cluster_config

    settings = settings_of(args)
    rows = check(settings, load_cluster_config(args.cluster_config))

    return Output({"cluster_config": args.cluster_config, "requests": rows}, views.capacity)


def cmd_kuberay(args) -> Output:
    from cluster.manifests import write_all

    paths = write_all(Path(args.config or "cluster/config/llmops.yaml"),
                      Path(args.cluster_config), Path(args.out), tuple(args.task or ["support-router"]))
    return Output({"written": [str(p) for p in paths]}, lambda p: "\n".join(p["written"]))
