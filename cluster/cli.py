"""`llmops`: the platform's command line. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def _format_job(result: dict) -> str:
    lines = [f"registered {result['model']} version {result['version']} as @{result['alias']} "
             f"(run {result['run_id']}, {result['seconds']} s)"]
    for holdout, metrics in result["metrics"].items():
        shown = {k: v for k, v in metrics.items() if k in (
            "macro_f1", "accuracy", "ece", "loss", "perplexity", "exact_match", "latency_p50_ms")}
        lines.append(f"  {holdout:14} " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    return "\n".join(lines)


def cmd_train(args) -> Output:
    from training.taskdata import TaskData, build_task_data

    settings = _settings(args)  # names, data and the registry are checked before the slow imports
    config = settings.training.overridden(args.task, workers=args.workers,
                                          deepspeed_stage=args.deepspeed_stage, epochs=args.epochs)
    data = TaskData.load(Path(args.data)) if args.data else build_task_data(config, args.task,
                                                                           args.scenario)
    tags = dict(t.split("=", 1) for t in args.tag)
    registry = _registry(settings)
    from training.job import fit_and_register

    runtime.connect(settings.ray, settings.monitoring.logging)
    result = fit_and_register(config, registry, args.task, data,
                              storage_path=settings.storage_path,
                              use_gpu=runtime.use_gpu(config.use_gpu), resume=args.resume,
                              tags=tags)
    return Output(result.to_dict(), _format_job)


def cmd_tune(args) -> Output:
    from training.tune import tune_task

    settings = _settings(args)
    tune = settings.tune if args.trials is None else settings.tune.model_copy(
        update={"trials": args.trials})
    registry = _registry(settings)
    runtime.connect(settings.ray, settings.monitoring.logging)
    result = tune_task(settings.training, tune, registry, args.task,
                       storage_path=settings.storage_path,
                       use_gpu=runtime.use_gpu(settings.training.use_gpu))
    return Output(result.to_dict(), _format_job)


def cmd_models(args) -> Output:
    settings = _settings(args)
    registry = _registry(settings)
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


def cmd_lineage(args) -> Output:
    from monitoring.log import read
    from training.lineage import chain
    from training.refs import model_name, pin, reference

    settings = _settings(args)
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
    return Output(out, _format_lineage)


def _format_lineage(p: dict, indent: str = "") -> str:
    def data(d: dict) -> str:
        rows = f", {d['rows']} rows" if d.get("rows") is not None else ""
        what = f": {d['description']}" if d.get("description") else ""
        return f"{d['name']} ({d['namespace']}{rows}{what})"

    lines = [f"{indent}{p['model']}"]
    run = p["trained_by"]
    if run is None:
        lines.append(f"{indent}  trained by: no lineage event (registered before lineage, or "
                     "elsewhere)")
    else:
        lines.append(f"{indent}  trained by {run['job']} run {run['run']} ({run['state']}, "
                     f"{run['started']} -> {run['ended']})")
        lines += [f"{indent}    input {data(d)}" for d in run["inputs"]]
    if p["retrain"]:
        r = p["retrain"]
        lines.append(f"{indent}  within {r['job']} run {r['run']}: {r.get('description') or ''}")
        lines += [f"{indent}    input {data(d)}" for d in r.get("inputs", [])]
    lines += [f"{indent}  deployed {d['at']} to {', '.join(d['deployments'])} ({d['why']})"
              for d in p["deployed"]]
    if "served" in p:
        s = p["served"]
        lines.append(f"{indent}  served {s['requests']} logged requests"
                     + (f" ({s['first']} -> {s['last']})" if s["requests"] else ""))
    for parent in p["from"]:
        lines.append(f"{indent}  fine-tuned from:")
        lines.append(_format_lineage(parent, indent + "    "))
    return "\n".join(lines)


def cmd_traffic(args) -> Output:
    from cluster.traffic import send, token
    from serve_apps.tls import client_context

    settings = _settings(args)
    app = getattr(settings.serve, args.app, None)
    prefix = app.route_prefix if app is not None else ""
    report = send(settings.serve.url, args.app, prefix, args.scenario, args.n, args.seed,
                  args.fraction, args.concurrency, args.feedback,
                  settings.serve.feedback.route_prefix, token(settings),
                  client_context(settings.serve.tls))
    return Output(report, lambda p: (f"{p['requests']} requests ({p['scenario']}) to {p['url']}: "
                                     f"{p['ok']} ok, {p['failed']} failed, {p['rps']} req/s, "
                                     f"p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms; "
                                     f"{p['feedback']['accepted']} labels given"))


def cmd_drift_check(args) -> Output:
    from monitoring.drift import check_model

    settings = _settings(args)
    registry = _registry(settings)
    decision = check_model(settings.log_uri, registry, settings.monitoring.drift, args.model,
                           window=args.window, report_dir=settings.data_dir.resolve() / "drift")

    def human(payload: dict) -> str:
        verdict = "DRIFT" if payload["drift"] else "no drift"
        lines = [f"{payload['model']} v{payload['version']}: {verdict} ({payload['drifted_windows']}"
                 f" of the last {len(payload['windows'])} windows drifted; policy {payload['k']} "
                 f"of {payload['n']})"]
        for w in payload["windows"]:
            shown = "  ".join(f"{m['name']} {m['value']:g}{'!' if m['drifted'] else ''}"
                              for m in w["metrics"])
            lines.append(f"  {w['end'][:19]} {w['rows']:>5} rows  {shown}")
        if payload["windows"][-1]["html"]:
            lines.append(f"report: {payload['windows'][-1]['html']}")
        return "\n".join(lines)

    return Output(decision.to_dict(), human)


def _verdicts(decisions: dict) -> str:
    return "; ".join(f"{m} v{d.version}: {'DRIFT' if d.drift else 'no drift'} "
                     f"({d.drifted_windows} of {len(d.windows)} windows)" if d is not None
                     else f"{m}: too few requests" for m, d in decisions.items()) or "no models"


def cmd_monitor(args) -> Output | None:
    import time

    from monitoring.monitor import Monitor

    settings = _settings(args)
    monitor = Monitor(_registry(settings), settings.log_uri, settings.monitoring,
                      settings.metrics_dir)
    if args.once:
        decisions = monitor.tick()
        return Output({"decisions": {m: d and d.to_dict() for m, d in decisions.items()},
                       "metrics": monitor.text()}, lambda p: p["metrics"].rstrip())
    cfg = settings.monitoring.monitor
    print(f"monitor: http://{cfg.host}:{cfg.port}/metrics, drift checks every {cfg.interval_s:g} s"
          " (Ctrl-C stops)", flush=True)
    monitor.serve(lambda d: print(f"{time.strftime('%H:%M:%S')} {_verdicts(d)}", flush=True))
    return None


def cmd_healthcheck(args) -> Output:
    import time

    from monitoring.health import check_champions
    from monitoring.metrics import health_families, registry_of, write_textfile

    settings = _settings(args)
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

    def human(payload: dict) -> str:
        lines = []
        for r in payload["results"]:
            lines.append(f"{r['model']} v{r['version']}: "
                         f"{'healthy' if r['healthy'] else 'DEGRADED'}"
                         + (f" ({r['error']})" if r["error"] else ""))
            lines += [f"  {c['name']:15} {c['value']:>10g}  registered {c['baseline']:g}  "
                      f"limit {c['limit']:g}{'' if c['ok'] else '  !'}" for c in r["checks"]]
        return "\n".join(lines + [f"metrics: {payload['textfile']}"])

    return Output({"healthy": healthy, "results": [r.to_dict() for r in results],
                   "textfile": str(textfile)}, human, exit_code=0 if healthy else 1)


def _format_state(p: dict) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(p["since"]))
    line = (f"{p['model']}: {p['state']} since {since}; champion v{p['champion']}"
            + (f", challenger v{p['challenger']}" if p.get("challenger") else ""))
    waiting = p.get("detail", {}).get("waiting")
    return line + (f" (waiting: {waiting})" if waiting else "")


def _format_events(events: list[dict]) -> list[str]:
    return [f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['from']} -> {e['to']}: "
            f"{e['reason']}" for e in events]


def cmd_controller(args) -> Output:
    from cluster.loop import actor, control, statuses, stop
    from monitoring.singleton import NAMESPACE

    settings = _settings(args)
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

    def human(payload: dict) -> str:
        lines = []
        for model, p in payload.items():
            state = _format_state(p["state"]) if p["state"] else f"{model}: no state yet"
            lines.append(state + ("" if p["running"] else "  [controller not running]"))
            lines += _format_events(p["events"])
        return "\n".join(lines)

    return Output(out, human)


def cmd_token_create(args) -> Output:
    from serve_apps.auth import issue, secret_path

    settings = _settings(args)
    token = issue(settings.serve.auth, settings.data_dir, tenant=args.tenant, scopes=args.scopes,
                  subject=args.subject, ttl_s=args.ttl)
    payload = {"token": token, "tenant": args.tenant, "scopes": args.scopes,
               "expires_in_s": args.ttl or settings.serve.auth.default_ttl_s,
               "secret_file": str(secret_path(settings.serve.auth, settings.data_dir))}
    return Output(payload, lambda p: p["token"])


def cmd_tls_dev_cert(args) -> Output:
    from serve_apps.tls import dev_cert

    settings = _settings(args)
    out = Path(args.out) if args.out else settings.data_dir / "tls"
    tls = dev_cert(out, args.host, args.days)
    return Output({"tls": tls, "days": args.days}, lambda p: "\n".join(
        ["serve:", "  tls:", *(f"    {k}: {v}" for k, v in p["tls"].items())]))


def cmd_audit_verify(args) -> Output:
    from monitoring.audit import anchor_path, verify

    settings = _settings(args)
    result = verify(settings.audit_dir,
                    anchor_path(settings.audit_dir, settings.monitoring.audit)).to_dict()

    def human(p: dict) -> str:
        if p["ok"]:
            return f"audit chain intact: {p['records']} records in {p['files']} files"
        bad = p["first_bad"]
        return f"audit chain BROKEN at {bad['file']} line {bad['line']}: {bad['reason']}"

    return Output(result, human, exit_code=0 if result["ok"] else 1)


def _when(text: str | None):
    """An ISO 8601 time (UTC unless it says otherwise), or None."""
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise LLMOpsError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25 or "
                          f"2026-11-25T12:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_audit_export(args) -> None:
    from monitoring.audit import export

    for line in export(_settings(args).audit_dir, _when(args.since), _when(args.until)):
        print(line)


def cmd_demo(args) -> Output:
    from cluster import demo

    settings = _settings(args)
    passed = [(flag, getattr(args, name, None)) for flag, name in (
        ("--config", "config"), ("--data-dir", "data_dir"), ("--mlflow-uri", "mlflow_uri"))]
    summary = demo.run(settings, [x for flag, value in passed if value for x in (flag, value)],
                       args.scenario, args.teardown, lambda text: print(text, flush=True))

    def human(p: dict) -> str:
        f1, at = p["macro_f1"], p["seconds_after_drift_onset"]
        drifted = ", ".join(f"{v} {x:.3f}" for v, x in f1["drifted_traffic"].items())
        return "\n".join([
            f"{p['model']}: {p['outcome']} (champion v{p['old_champion']} -> v{p['new_champion']})",
            f"macro-F1: {f1['clean_traffic_before_drift']:.3f} on clean traffic before the drift; "
            f"on {p['scenario']} traffic {drifted} ({f1['recovered']:.0%} recovered)",
            f"requests served {p['requests_served']}, failed {p['requests_failed']}",
            "after the drift began: " + ", ".join(
                f"{k.replace('_', ' ')} {v} s" for k, v in at.items() if v is not None),
            f"the demo took {p['seconds_total'] / 60:.1f} min",
            *[f"{k}: {v}" for k, v in p["where_to_look"].items()]])

    return Output(summary, human, exit_code=0 if summary["requests_failed"] == 0 else 1)


def _manual(method: str, *args_of: str):
    def command(args) -> Output:
        from cluster.loop import control

        settings = _settings(args)
        state = control(settings, args.model, method, *(getattr(args, a) for a in args_of))
        return Output(state, _format_state)
    return command


def _serve_cluster(settings: Settings):
    from serve_apps.deploy import ServeCluster

    try:
        cluster = ServeCluster(settings.dashboard_address)  # (its client connects at once)
        cluster.details()
    except Exception as exc:
        raise LLMOpsError(f"no Ray dashboard at {settings.dashboard_address} "
                          f"(start the platform with `llmops up`)") from exc
    return cluster


def _generated_serve_config(settings: Settings, registry, gpus: float) -> dict:
    from serve_apps.deploy import serve_config

    gpu = runtime.wants_gpu(settings.serve.use_gpu, gpus)
    return serve_config(settings.serve, registry.tracking_uri, gpu, dict(runtime.PLATFORM_ENV),
                        settings.log_settings(), settings.governance(),
                        logging=settings.monitoring.logging.serve())


def _format_status(payload: dict) -> str:
    lines = []
    for app, a in payload["applications"].items():
        lines.append(f"{app:11} {a['status']:10} {a['route_prefix']}")
        for dep, d in a["deployments"].items():
            replicas = " ".join(f"{n} {s.lower()}" for s, n in d["replicas"].items()) or "0"
            model = f"{d['model']} (@{d['alias']})" if d["alias"] else (d["model"] or "")
            canary = d.get("canary")
            if canary:
                mode = "shadow" if canary["shadow"] else f"{canary['fraction']:.0%}"
                model += f" + canary {canary['model']} {mode}"
            if d.get("adapters"):
                model += " + adapters " + ", ".join(f"{name}={ad['model']}"
                                                    for name, ad in d["adapters"].items())
            if d.get("inline_in"):
                model += f" (inline in {d['inline_in']})"
            lines.append(f"  {dep:20} {d['status']:9} {replicas:12} {model}")
    for model, c in payload.get("controllers", {}).items():
        state = c["state"]["state"] if c["state"] else "no state yet"
        lines.append(f"controller {model}: {state}" + ("" if c["running"] else " (not running)"))
    if "monitor" in payload:
        m = payload["monitor"]
        lines.append(f"monitor: {m['metrics']}" if m["running"] else
                     f"monitor: not running{': ' + m['error'] if m.get('error') else ''}")
    return "\n".join(lines + [f"http: {payload['url']}"]) if lines else "no applications"


def cmd_up(args) -> Output:
    import yaml

    from serve_apps import tls
    from serve_apps.auth import ensure_secret, secret_path

    settings = _settings(args)
    tls.check(settings.serve.tls)
    registry = _registry(settings)
    if any(a.startswith("HS") for a in settings.serve.auth.algorithms):  # a weak one: refused
        ensure_secret(secret_path(settings.serve.auth, settings.data_dir.resolve()))
    started = False
    if settings.ray.address is None:
        started = runtime.start_head(settings.ray, settings.data_dir)
    config = _generated_serve_config(settings, registry, runtime.cluster_gpus(settings.ray.address))
    path = settings.data_dir / "serve_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster = _serve_cluster(settings)
    seconds = cluster.deploy(config, timeout_s=args.timeout)
    from cluster import loop

    begun = loop.start(settings)
    payload = {"url": settings.serve.url, "dashboard": settings.dashboard_address,
               "serve_config": str(path), "started_ray": started, "seconds": round(seconds, 1),
               "applications": cluster.status(), **loop.status(settings)}
    if begun["monitor"] is not None:  # what it said once started (a port in use, say)
        payload["monitor"] |= {k: begun["monitor"][k] for k in ("running", "error")}
    return Output(payload, _format_status)


def cmd_status(args) -> Output:
    from cluster import loop

    settings = _settings(args)
    payload = {"url": settings.serve.url, "applications": _serve_cluster(settings).status(),
               **loop.status(settings)}
    return Output(payload, _format_status)


def cmd_down(args) -> Output:
    from cluster import loop

    settings = _settings(args)
    try:
        _serve_cluster(settings).shutdown()
        removed = True
    except LLMOpsError:
        removed = False
    halted = loop.stop_all(settings) if removed else {"controllers": [], "monitor": False}
    controllers = halted["controllers"]
    stopped = runtime.stop_head(settings.data_dir)
    return Output({"applications_removed": removed, "controllers_stopped": controllers,
                   "monitor_stopped": halted["monitor"], "ray_stopped": stopped},
                  lambda p: ("removed the Serve applications; " if removed else "no Serve running; ")
                  + (f"stopped the controllers of {', '.join(controllers)}; " if controllers else "")
                  + ("stopped the monitor; " if halted["monitor"] else "")
                  + ("stopped the local Ray head" if stopped else "left Ray running (not started "
                     "by llmops up)"))


def _format_change(p: dict) -> str:
    what = f"now serving {p['serving']}" if "serving" in p else "canary updated"
    return f"{p['model']}: {what} on {', '.join(p['deployments'])} ({p['seconds']} s)"


def cmd_swap(args) -> Output:
    from serve_apps.deploy import swap

    settings = _settings(args)
    registry = _registry(settings)
    result = swap(_serve_cluster(settings), args.model, registry.tracking_uri,
                  version=args.version, alias=args.alias)
    registry.lineage.deployed(registry.tracking_uri, result["serving"], result["deployments"],
                              f"llmops swap to {result['serving']}")
    return Output(result, _format_change)


def cmd_canary(args) -> Output:
    from pydantic import ValidationError

    from serve_apps.config import CanaryConfig
    from serve_apps.deploy import set_canary
    from training.refs import reference

    settings = _settings(args)
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
    result = set_canary(_serve_cluster(settings), args.model, registry.tracking_uri, canary)
    return Output(result, _format_change)


def cmd_serve_config(args) -> None:
    import yaml

    settings = _settings(args)
    registry = _registry(settings)
    try:  # `auto` is read as `llmops up` reads it: the running cluster's GPUs
        gpus = runtime.cluster_gpus(settings.ray.address) if settings.serve.use_gpu == "auto" else 0
    except ConnectionError:  # none runs: as on a cluster without GPUs
        gpus = 0
    print(yaml.safe_dump(_generated_serve_config(settings, registry, gpus), sort_keys=False))


def cmd_cluster_check(args) -> Output:
    from cluster.capacity import check, load_cluster_config

    settings = _settings(args)
    rows = check(settings, load_cluster_config(args.cluster_config))

    def human(p: dict) -> str:
        return "\n".join(f"{r['who']:36} x{r['count']:<3} {r['resources']} -> "
                         f"{', '.join(r['node_types'])}" for r in p["requests"])
    return Output({"cluster_config": args.cluster_config, "requests": rows}, human)


def cmd_kuberay(args) -> Output:
    from cluster.manifests import write_all

    paths = write_all(Path(args.config or "cluster/config/llmops.yaml"),
                      Path(args.cluster_config), Path(args.out), tuple(args.task or ["support-router"]))
    return Output({"written": [str(p) for p in paths]}, lambda p: "\n".join(p["written"]))


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
    gen.set_defaults(func=cmd_data_generate)
    data_sub.add_parser("scenarios", parents=[common],
                        help="list the drift scenarios").set_defaults(func=cmd_data_scenarios)

    train = sub.add_parser("train", parents=[common], help="fine-tune and register a model")
    train.add_argument("task", help="a task of training.tasks: support-router, moderation, "
                       "rewriter, support-reply or one of your own")
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
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", parents=[common], help="search learning rate and epochs")
    tune.add_argument("task")
    tune.add_argument("--trials", type=int)
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=cmd_tune)

    models = sub.add_parser("models", parents=[common], help="registered models and aliases")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    lineage = sub.add_parser("lineage", parents=[common], help="a model version's chain from "
                             "data to deployment to served requests (OpenLineage events)")
    lineage.add_argument("model", help="MODEL@VERSION or MODEL@ALIAS")
    lineage.add_argument("--json", action="store_true")
    lineage.set_defaults(func=cmd_lineage)

    up = sub.add_parser("up", parents=[common], help="start Ray (if needed) and deploy the apps")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait for RUNNING")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_up)
    status = sub.add_parser("status", parents=[common], help="applications, replicas, versions")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    down = sub.add_parser("down", parents=[common], help="remove the apps, stop the loop's "
                          "actors; stop Ray if `up` started it")
    down.add_argument("--json", action="store_true")
    down.set_defaults(func=cmd_down)
    swap = sub.add_parser("swap", parents=[common], help="hot-swap the version a model serves")
    swap.add_argument("model")
    which = swap.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int)
    which.add_argument("--alias")
    swap.add_argument("--json", action="store_true")
    swap.set_defaults(func=cmd_swap)
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
    canary.set_defaults(func=cmd_canary)
    sub.add_parser("serve-config", parents=[common], help="print the generated Serve config"
                   ).set_defaults(func=cmd_serve_config)

    cluster = sub.add_parser("cluster", help="a multi-node cluster's config (`ray up`)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    ccheck = cluster_sub.add_parser(
        "check", parents=[common], help="check that every replica and fine-tune worker the "
        "settings ask for fits some node type of the cluster config (exit 2 if not)")
    ccheck.add_argument("--cluster-config", default="cluster.yaml", metavar="FILE")
    ccheck.add_argument("--json", action="store_true")
    ccheck.set_defaults(func=cmd_cluster_check)
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
    kuberay.set_defaults(func=cmd_kuberay)

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
    traffic.add_argument("--json", action="store_true")
    traffic.set_defaults(func=cmd_traffic)

    drift = sub.add_parser("drift", help="drift of served traffic against the training data")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    check = drift_sub.add_parser("check", parents=[common],
                                 help="check a model's logged traffic once (`!` marks a metric "
                                 "over its threshold)")
    check.add_argument("model", help="a served classifier, e.g. support-router")
    check.add_argument("--window", type=int, help="requests per window (default from settings)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_drift_check)

    token = sub.add_parser("token", help="development bearer tokens (JWT)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[common], help="print a token signed with "
                                  "the local secret (<data_dir>/auth/jwt_secret, made if absent)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", nargs="+", required=True,
                        help="moderate, support, chat, feedback, admin")
    create.add_argument("--subject", help="the principal (default <tenant>-dev)")
    create.add_argument("--ttl", type=int, help="seconds the token is valid (default "
                        "serve.auth.default_ttl_s)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_token_create)

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
    dev.set_defaults(func=cmd_tls_dev_cert)

    audit = sub.add_parser("audit", help="the hash-chained audit log of every inference")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", parents=[common],
                                  help="check the chain; exit 1 and name the first bad line")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_audit_verify)
    export = audit_sub.add_parser("export", parents=[common],
                                  help="print the records (JSON lines) for a log shipper")
    export.add_argument("--since", help="ISO 8601 time, inclusive (UTC unless it says)")
    export.add_argument("--until", help="ISO 8601 time, exclusive")
    export.set_defaults(func=cmd_audit_export)

    ctl = sub.add_parser("controller", parents=[common],
                         help="the closed loop per model: drift -> retrain -> gate -> canary -> "
                         "promotion")
    ctl.add_argument("action", choices=["start", "stop", "status", "step"],
                     help="start/stop the detached controller actors on the cluster, show their "
                     "state and transitions, or run one step here")
    ctl.add_argument("models", nargs="*", help="default: controller.models in the settings")
    ctl.add_argument("--events", type=int, default=10, help="transitions shown per model")
    ctl.add_argument("--json", action="store_true")
    ctl.set_defaults(func=cmd_controller)
    promote = sub.add_parser("promote", parents=[common],
                             help="make the challenger (or the canary) the champion now")
    promote.add_argument("model")
    promote.add_argument("--json", action="store_true")
    promote.set_defaults(func=_manual("promote"))
    rollback = sub.add_parser("rollback", parents=[common],
                              help="end a canary, or make an earlier version the champion again")
    rollback.add_argument("model")
    rollback.add_argument("--to-version", type=int, help="default: the previous champion")
    rollback.add_argument("--json", action="store_true")
    rollback.set_defaults(func=_manual("rollback", "to_version"))
    retrain = sub.add_parser("retrain", parents=[common],
                             help="retrain on labelled recent traffic now, without waiting for "
                             "drift (the gate and the canary still apply)")
    retrain.add_argument("model")
    retrain.add_argument("--now", action="store_true", required=True)
    retrain.add_argument("--json", action="store_true")
    retrain.set_defaults(func=_manual("retrain_now"))

    demo = sub.add_parser("demo", parents=[common],
                          help="the whole loop on this machine: train, serve, drift, retrain, "
                          "gate, canary, promote")
    demo.add_argument("--scenario", default="new-product", help="the drift to mix in")
    demo.add_argument("--teardown", action="store_true", help="stop everything at the end")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    monitor = sub.add_parser("monitor", parents=[common],
                             help="check drift on a schedule and serve Prometheus metrics")
    monitor.add_argument("--once", action="store_true",
                         help="one round of checks; print the metrics and exit")
    monitor.add_argument("--json", action="store_true")
    monitor.set_defaults(func=cmd_monitor)

    health = sub.add_parser("healthcheck", parents=[common],
                            help="measure each champion on its golden set against its "
                            "registration; exit 1 when degraded")
    health.add_argument("models", nargs="*", help="registered models (default: every champion)")
    health.add_argument("--textfile", help="Prometheus textfile to write (default "
                        "<data_dir>/metrics/healthcheck.prom, served by `llmops monitor`)")
    health.add_argument("--pushgateway", metavar="URL", help="also push to a Pushgateway")
    health.add_argument("--json", action="store_true")
    health.set_defaults(func=cmd_healthcheck)
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
