"""`llmops demo`: the whole loop on one machine. Trains and registers the first champions if
absent, deploys the pipelines, starts the support router's controller, replays clean traffic,
then a drift scenario with feedback labels, and prints the controller's transitions as they
happen until the retrained router serves (or the loop stops at the gate or the canary)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable

from cluster.controller import actor, control
from cluster.settings import Settings
from cluster.traffic import send
from training.errors import LLMOpsError
from training.registry import CHAMPION, Registry

MODEL = "support-router"
TASKS = ("support-router", "moderation", "rewriter", "support-reply")


def _cli(settings_args: list[str], *args: str) -> None:
    """A step as its own `llmops` command (its progress goes to stderr)."""
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args, *settings_args],
                          stdout=sys.stderr)
    if done.returncode != 0:
        raise LLMOpsError(f"`llmops {' '.join(args)}` failed (exit {done.returncode})")


def run(settings: Settings, settings_args: list[str], scenario: str, teardown: bool,
        say: Callable[[str], None], timeout_s: float = 900) -> dict:
    started = time.time()

    def step(text: str) -> None:
        say(f"[{time.time() - started:6.0f} s] {text}")

    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    for task in TASKS:
        if registry.alias_version(task, CHAMPION) is None:
            step(f"training the first {task} (DeepSpeed on Ray Train)")
            _cli(settings_args, "train", task)
    step("deploying the pipelines (llmops up)")
    _cli(settings_args, "up")
    old = registry.alias_version(MODEL, CHAMPION)
    actor(settings, MODEL, start=True)
    step(f"controller for {MODEL} v{old} started (Ray actor, Actors tab of the dashboard)")
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    prefix, feedback = settings.serve.support.route_prefix, settings.serve.feedback.route_prefix
    reports = []

    def traffic(scenario: str, n: int, seed: int, fraction: float = 1.0, labels: float = 0.0):
        r = send(url, "support", prefix, scenario, n, seed, fraction, 8, labels, feedback)
        reports.append(r)
        step(f"sent {n} {scenario} requests ({r['ok']} ok, {r['failed']} failed, {r['rps']} "
             f"req/s), {r['feedback']['accepted']} labelled")

    seen, outcome, seed, shown = len(control(settings, MODEL, "events")), None, 3, 0
    traffic("base", settings.monitoring.drift.window, seed=1)
    onset = time.time()
    traffic(scenario, 2 * settings.monitoring.drift.window, seed=2, labels=0.3)
    while outcome is None and time.time() - started < timeout_s:
        for e in control(settings, MODEL, "events")[seen:]:
            step(f"{e['from']} -> {e['to']}: {e['reason']}")
            seen += 1
            if e["to"] == "serving" and e["from"] != "serving":
                outcome = e  # promoted, or the loop stopped at the gate or the canary
        state = control(settings, MODEL, "state")
        if outcome is None and state["state"] == "canary":
            traffic(scenario, 200, seed=seed, fraction=0.5, labels=0.3)  # for it to be judged
            seed += 1
        elif outcome is None:
            if state["state"] == "retraining":
                shown = _progress(settings, state["retrain_id"], shown, step)
            time.sleep(3)
    new = registry.alias_version(MODEL, CHAMPION)
    promoted = outcome is not None and outcome["from"] == "promoting"
    summary = {
        "scenario": scenario, "model": MODEL, "old_champion": old, "new_champion": new,
        "outcome": ("promoted" if promoted else outcome["from"] if outcome else "timed out"),
        "accuracy_on_drifted_traffic": _accuracy(registry, scenario, {old, new}),
        "requests_served": sum(r["ok"] for r in reports),
        "requests_failed": sum(r["failed"] for r in reports),
        "seconds_from_drift_onset_to_new_champion": round(outcome["ts"] - onset, 1)
        if promoted else None,
        "seconds_total": round(time.time() - started, 1),
        "where_to_look": {
            "ray_dashboard": settings.dashboard_address,
            "mlflow_ui": f"mlflow ui --backend-store-uri {registry.tracking_uri}",
            "grafana_dashboard": "monitoring/grafana/llmops.json",
            "controller": "llmops controller status"}}
    if teardown:
        step("tearing down (llmops down)")
        _cli(settings_args, "controller", "stop", MODEL)
        _cli(settings_args, "down")
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


def _accuracy(registry: Registry, scenario: str, versions: set[int]) -> dict[str, float]:
    """Each version's accuracy on fresh labelled traffic of the scenario (a seed of its own)."""
    from training.data import generate

    df = generate("support-tickets", scenario, 300, seed=4242)
    return {f"v{v}": round(float((registry.load_model(MODEL, v).predict(None, df[["text"]])
                                  .label == df.label).mean()), 4) for v in sorted(versions)}
