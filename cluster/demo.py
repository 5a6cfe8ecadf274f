"""`llmops demo`: the whole loop on one machine. Trains and registers the first champions if
absent, deploys the pipelines, starts the support router's controller, replays clean traffic,
then a drift scenario with feedback labels, and prints the controller's transitions as they
happen until the retrained router serves (or the loop stops at the gate or the canary). With
`--model rewriter` the same for a generator: chat traffic, corrected answers as feedback
(`--model support-reply`: support traffic, its replies corrected)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cluster import platform, runtime
from cluster.loop import actor, control
from cluster.settings import Settings
from cluster.traffic import generator_app, generator_target, send, token
from serve_apps.tls import client_context
from training.errors import LLMOpsError
from training.registry import CHAMPION, Registry

MODEL = "support-router"
TASKS = ("support-router", "moderation", "rewriter", "support-reply", "advisor-intent")
QUALITY_ROWS = 1000  # fresh rows each macro-F1 of the summary is measured on


def _cli(settings_args: list[str], *args: str, env: dict | None = None) -> None:
    """A step as its own `llmops` command (its progress goes to stderr)."""
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args, *settings_args],
                          stdout=sys.stderr, env=env)
    if done.returncode != 0:
        raise LLMOpsError(f"`llmops {' '.join(args)}` failed (exit {done.returncode})")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def prepare(settings: Settings, settings_args: list[str], step: Callable[[str], None]) -> None:
    """The first champions (trained and registered if absent) and the pipelines, deployed."""
    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    if settings.ray.address is None and runtime.start_head(settings.ray, Path(settings.data_dir)):
        step(f"started the local Ray head (dashboard {settings.dashboard_address})")
    # the trainings join that head instead of each starting and stopping a Ray of its own
    env = {**os.environ, "LLMOPS_RAY__ADDRESS": settings.ray.address or "auto"}
    missing = [task for task in TASKS if registry.alias_version(task, CHAMPION) is None]
    if missing:  # one process: its imports and Ray connection are paid once
        step(f"training the first {', '.join(missing)} (DeepSpeed on Ray Train, one after "
             f"another)")
        _cli(settings_args, "train", *missing, "--deepspeed-stage",
             str(settings.training.deepspeed.stage), env=env)
    step("deploying the pipelines and starting the loop (llmops up)")
    platform.up(settings)


@dataclass
class Traffic:
    """The demo's traffic to the support pipeline (or, for a generator `model`, to the
    application it answers in, `generator_app`), a `labels` share of each batch labelled (a
    generator's answers: corrected) as human review would (`labelling`: from the platform's
    queue, or at random)."""

    settings: Settings
    step: Callable[[str], None]
    labels: float = 0.3
    labelling: str = "queue"
    model: str = MODEL
    reports: list = field(default_factory=list)

    def __call__(self, scenario: str, n: int, seed: int, fraction: float = 1.0,
                 labelled: bool = True) -> None:
        s = self.settings
        generator = s.training.task(self.model).kind == "causal-lm"
        app = generator_app(s, self.model) if generator else "support"
        r = send(s.serve.url, app, getattr(s.serve, app).route_prefix, scenario, n,
                 seed, fraction, 8, self.labels if labelled else 0.0,
                 s.serve.feedback.route_prefix, token(s), client_context(s.serve.tls),
                 self.labelling, generator_target(s, app, self.model) if generator else None,
                 self.model)
        self.reports.append(r)
        self.step(f"sent {n} {scenario} requests ({r['ok']} ok, {r['failed']} failed, "
                  f"{r['rps']} req/s), {r['feedback']['accepted']} labelled")

    def totals(self) -> dict:
        return {"requests_served": sum(r["ok"] for r in self.reports),
                "requests_failed": sum(r["failed"] for r in self.reports),
                "labels_used": sum(r["feedback"]["accepted"] for r in self.reports),
                "labelling": self.labelling}


def drift_loop(settings: Settings, scenario: str, step: Callable[[str], None],
               timeout_s: float = 900, labels: float = 0.3, labelling: str = "queue",
               settle: int = 0, model: str = MODEL, quality_rows: int = QUALITY_ROWS) -> dict:
    """Clean traffic, then `scenario` with feedback labels, with the router's controller running;
    follows its transitions until the loop ends (a new champion, new class priors confirmed,
    or a stop at the gate or the canary). With `settle`, the loop's outcome goes on answering
    the drifted traffic until it has answered `settle` requests with the controller still
    serving (the drift checks may find what a retrain missed, or that the drift is still
    there, and start again), and one window more while the last checks hold a drifted one
    (`_undecided`). Returns the figures:
    when each step happened after the drift began, macro-F1 (a generator's token F1) before
    and after (on `quality_rows` fresh rows), requests served and failed, labels used."""
    registry = Registry(settings.registry, settings.data_dir)
    old = registry.alias_version(model, CHAMPION)
    actor(settings, model, start=True)
    step(f"controller for {model} v{old} running (Ray actor, Actors tab of the dashboard)")
    traffic = Traffic(settings, step, labels, labelling, model)
    seen, events, seed, shown = len(control(settings, model, "events")), [], 3, 0
    drifted = calm = 0  # drifted requests since the last transition; since it, while serving
    window = settings.monitoring.drift.window
    recovered_with, sent = None, time.time()  # labels when the loop last came back to serving
    started = time.time()
    traffic("base", 300, seed=1, labelled=False)
    onset = time.time()
    while time.time() - started < timeout_s:
        for e in control(settings, model, "events")[seen:]:
            step(f"{e['from']} -> {e['to']}: {e['reason']}")
            seen += 1
            events.append(e)
            drifted = calm = 0
            if e["to"] == "serving":
                recovered_with = traffic.totals()["labels_used"]
        last = events[-1] if events else {}
        # back to serving (promoted, new priors settled, stopped at the gate or canary), watched
        settled = last.get("to") == "serving" and calm >= settle
        # once the checks have seen the last batch (a step every interval_s after the log's flush)
        if settled and (not settle or time.time() - sent > 2 * settings.controller.interval_s):
            if not settle or calm >= settle + window or not _undecided(settings, registry, model,
                                                                       last["ts"]):
                break
            settled = False
        current = control(settings, model, "state")
        if current["state"] in ("serving", "drift_suspected", "reweighted") and not settled \
                and drifted < max(2000, settle + window):
            traffic(scenario, 250, seed=seed)  # until the controller acts on it
            drifted, calm, sent = drifted + 250, calm + 250, time.time()
        elif current["state"] == "canary":
            traffic(scenario, 200, seed=seed, fraction=0.5)  # for it to be judged
        else:
            if current["state"] == "retraining":
                shown = _progress(settings, current["retrain_id"], shown, step)
            time.sleep(3)
        seed += 1
    return _summary(registry, scenario, old, events, onset, traffic.totals(), recovered_with,
                    settings.serve.support.classifier.error_rate, model,
                    settings.training.task(model), quality_rows)


def _undecided(settings: Settings, registry: Registry, model: str, since: float) -> bool:
    """Whether the drift checks of the traffic since `since` hold a drifted window: fewer than
    the policy's `k` of its last `n`, but the next window may tip it (a concept
    shift a retrain partly missed read as drift on its third window, one check before the
    settle would have ended)."""
    from monitoring.drift import NotEnoughData, check_model

    try:
        return check_model(settings.log_uri, registry, settings.monitoring.drift, model,
                           since=datetime.fromtimestamp(since, UTC)).drifted_windows > 0
    except NotEnoughData:
        return False


def _summary(registry: Registry, scenario: str, old: int, events: list[dict], onset: float,
             totals: dict, recovered_with: int | None, error_rate: float | None, model: str,
             task, quality_rows: int) -> dict:
    def after(to: str, came_from: str | None = None, last: bool = False) -> float | None:
        found = [round(e["ts"] - onset, 1) for e in events
                 if e["to"] == to and came_from in (None, e["from"])]
        return (found[-1] if last else found[0]) if found else None

    new = registry.alias_version(model, CHAMPION)
    promotions = [e for e in events if (e["from"], e["to"]) == ("promoting", "serving")]
    outcome = "promoted" if promotions else events[-1]["from"] if events else "timed out"
    return {
        "scenario": scenario, "model": model, "old_champion": old, "new_champion": new,
        "outcome": outcome, "retrains": sum(e["to"] == "retraining" for e in events),
        "promotions": len(promotions),
        "seconds_after_drift_onset": {
            "drift_detected": after("drift_suspected"),
            "priors_adjusted": after("reweighted"),
            "challenger_registered": after("evaluating", "retraining"),
            "new_champion_serving": after("serving", "promoting", last=True),
            "priors_confirmed": after("serving", "reweighted")},
        **({"macro_f1": quality(registry, scenario, old, new, error_rate, quality_rows)}
           if task.kind == "classification" else
           {"token_f1": generation_quality(registry, model, task, scenario, old, new)}),
        **totals,
        # the labels sent until the loop last came back to serving (all of them if it never did)
        "labels_used": totals["labels_used"] if recovered_with is None else recovered_with,
        "labels_sent": totals["labels_used"]}


def run(settings: Settings, settings_args: list[str], scenario: str, teardown: bool,
        say: Callable[[str], None], timeout_s: float = 900, model: str = MODEL) -> dict:
    started = time.time()

    def step(text: str) -> None:
        say(f"[{time.time() - started:6.0f} s] {text}")

    settings.training.task(model)  # a task the demo can train and loop on, before any work
    prepare(settings, settings_args, step)
    summary = drift_loop(settings, scenario, step, timeout_s, model=model)
    summary |= {
        "seconds_total": round(time.time() - started, 1),
        "where_to_look": {
            "ray_dashboard": settings.dashboard_address,
            "mlflow_ui": "mlflow ui --backend-store-uri "
                         + Registry(settings.registry, settings.data_dir).tracking_uri,
            "grafana_dashboard": "monitoring/grafana/llmops.json",
            "controller": "llmops controller status"}}
    if teardown:
        step("tearing down (llmops down)")
        platform.down(settings)
    return summary


def _progress(settings: Settings, job_id: str, shown: int, step: Callable[[str], None]) -> int:
    """Print the retrain job's new progress lines (epochs, steps, losses); returns how many
    log lines have been looked at."""
    from ray.job_submission import JobSubmissionClient

    try:
        lines = JobSubmissionClient(settings.dashboard_address).get_job_logs(job_id).splitlines()
    except RuntimeError:
        return shown  # not submitted yet
    for line in lines[shown:]:
        text = re.sub(r"\x1b\[[0-9;]*m", "", line).split(")", 1)[-1].strip()
        if text.startswith(("epoch ", "run ")):  # progress, and where the checkpoints go
            step("  retrain: " + text)
    return len(lines)


def quality(registry: Registry, scenario: str, old: int, new: int,
            error_rate: float | None, rows: int = QUALITY_ROWS) -> dict:
    """Macro-F1 on `rows` of fresh traffic (a seed of its own) against their true labels
    (`true_labels`): the old champion on clean traffic (the level to recover), each version on
    the drifted traffic, and the recovered share; how the version now served abstains on the
    drifted traffic (at `error_rate`), its precision also against the generator's noisy labels
    (what annotators would have said)."""
    from training.evaluate import abstention_metrics, score
    from training.priors import ratios, training_priors

    models = {v: registry.load_model(MODEL, v) for v in {old, new}}
    clean, drifted, noisy = scored_tickets(scenario, rows)
    before = score(models[old], clean, "macro_f1")
    on_drift = {f"v{v}": round(score(m, drifted, "macro_f1"), 4) for v, m in sorted(models.items())
                if v != new}
    served, weights = f"v{new}", None
    priors = registry.priors(MODEL, new)
    if priors:  # the loop answered a label shift with new priors: what serving answers now
        trained = training_priors(list(priors), registry.reference_profile(MODEL, new).label)
        on_drift[served] = round(score(models[new], drifted, "macro_f1"), 4)
        served, weights = served + " with its new priors", ratios(priors, dict(zip(priors,
                                                                                  trained)))
    now = abstention_metrics(models[new], drifted, [error_rate], weights, noisy.label)[0]
    on_drift[served] = now.pop("macro_f1")  # the served version predicted once
    return {"clean_traffic_before_drift": round(before, 4), "drifted_traffic": on_drift,
            "recovered": round(on_drift[served] / before, 3), "served_on_drifted_traffic": now}


def scored_tickets(scenario: str, rows: int) -> tuple:
    """The tickets `quality` scores on (a seed of their own): clean and `scenario` traffic with
    their true labels, and the same `scenario` traffic with the generator's noisy ones."""
    from training.data import generate, true_labels

    noisy = generate("support-tickets", scenario, rows, seed=4242)
    clean, drifted = (df.assign(label=true_labels("support-tickets", df)) for df in (
        generate("support-tickets", "base", rows, seed=4242), noisy))
    return clean, drifted, noisy


def generation_quality(registry: Registry, model: str, task, scenario: str, old: int,
                       new: int, rows: int = 300) -> dict:
    """A generator's token F1 (`training.evaluate.token_f1`) on fresh prompts of its task
    against their reference texts: the old champion on clean prompts (the level to recover),
    each version on the drifted ones, and the recovered share."""
    from training.data import generate
    from training.evaluate import GENERATION_METRIC, score

    models = {v: registry.load_model(model, v) for v in {old, new}}
    clean, drifted = (generate(task.dataset, s, rows, seed=4242, priors=task.label_priors)
                      for s in ("base", scenario))
    before = score(models[old], clean, GENERATION_METRIC)
    on_drift = {f"v{v}": round(score(m, drifted, GENERATION_METRIC), 4)
                for v, m in sorted(models.items())}
    return {"clean_traffic_before_drift": round(before, 4), "drifted_traffic": on_drift,
            "recovered": round(on_drift[f"v{new}"] / before, 3)}

