"""The loop's actors (`cluster/loop.py`) on the session's Ray: `up` starts a controller per model
and the monitor, `down` stops them; the monitor in the foreground; a controller actor killed
mid-retrain or mid-canary resumes the same job or canary; a retrain lost with the cluster is
submitted again. Each retrain is a real Ray job (Ray Train + DeepSpeed) that registers a
challenger."""

import json
import time

import pytest
from conftest import free_port, wait_for
from loop_stack import MODEL, log_served

from cluster.controller import PREVIOUS
from cluster.settings import CanaryPolicy
from cluster.state import ControllerState
from monitoring.config import LogConfig
from monitoring.log import INFERENCE, SegmentWriter, now
from training.registry import (
    CHALLENGER,
    CHAMPION,
)


def test_up_starts_the_loop_and_down_stops_it(loop):
    """What `llmops up` and `llmops down` call: a controller actor per configured model and the
    monitor, and `llmops status` / `controller status` seeing them, without a Ray driver of
    their own."""
    import httpx

    from cluster.loop import start, status, statuses, stop_all

    settings, registry, controller = loop
    settings.controller.models = [MODEL]
    settings.monitoring.monitor.autostart = False
    assert start(settings) == {"controllers": [], "monitor": None}  # both opted out
    settings.controller.autostart = settings.monitoring.monitor.autostart = True
    settings.monitoring.monitor.port = free_port()
    try:
        begun = start(settings)
        assert begun["controllers"] == [MODEL] and begun["monitor"]["running"], begun
        state = wait_for("the controller's first step, which saves its state", lambda: (
            s := statuses(settings, [MODEL], 1)[MODEL])["state"] and s, 30)
        assert state["running"] and state["state"]["champion"] == 1
        metrics = httpx.get(status(settings)["monitor"]["metrics"], timeout=10).text
        assert f'llmops_model_versions{{model="{MODEL}"}} 2.0' in metrics  # it read the registry
        assert start(settings)["monitor"]["running"]  # a second `up` finds the same actor
    finally:
        assert stop_all(settings) == {"controllers": [MODEL], "monitor": True}
    wait_for("the dashboard to see the actors gone", lambda: not (
        (now := status(settings))["controllers"][MODEL]["running"] or now["monitor"]["running"]),
        30)
    assert stop_all(settings) == {"controllers": [], "monitor": False}


def test_the_foreground_monitor_logs_a_json_line_per_verdict(loop, tmp_path):
    """`llmops monitor` in the foreground logs as the platform's Ray processes do: every line
    on stderr is JSON, the verdict's figures are fields, and SIGTERM stops it after a check."""
    import signal
    import subprocess
    import sys

    import yaml

    settings, registry, _ = loop
    log_served(settings, registry, "base", 1500, 1)
    settings.monitoring.monitor.port = free_port()
    config = tmp_path / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "monitor", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        checked = f'llmops_drift_check_timestamp_seconds{{model="{MODEL}"}}'
        wait_for("a drift check", lambda: proc.poll() is not None
                 or checked in _scrape(settings.monitoring.monitor.port), 120)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0  # stopped, not interrupted
    assert [line for line in err.splitlines() if not line.startswith("{")] == []
    lines = [json.loads(line) for line in err.splitlines()]
    [verdict] = [r for r in lines if r.get("model") == MODEL]
    assert verdict["levelname"] == "INFO" and verdict["name"] == "monitoring.monitor"
    assert verdict["model_version"] == "1" and verdict["drift"] is False
    assert verdict["windows"] >= 1 and "no drift" in verdict["message"]
    assert any("/metrics" in r["message"] for r in lines)


def _scrape(port: int) -> str:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return ""


def _actor_state(settings) -> dict:
    """The model's state from its controller actor, waiting while Ray restarts a killed one."""
    import ray

    from cluster.loop import control

    def state() -> dict | None:
        try:
            return control(settings, MODEL, "state")
        except ray.exceptions.RayActorError:
            return None

    return wait_for("the controller actor to come back", state, 60, every_s=1)


def _canary_traffic(settings, variant: str, n: int, start: int = 0) -> None:
    """What serving logs while a canary runs: `n` answers of one side (v1 the champion, v2 the
    challenger), equally fast and confident."""
    SegmentWriter(settings.log_uri, INFERENCE, LogConfig()).write_segment([
        {"request_id": f"{variant}-{start + i}", "item": 0, "ts": now(), "tenant": "default",
         "application": "support", "model": MODEL, "variant": variant,
         "model_version": "1" if variant == "champion" else "2", "prediction": "billing",
         "confidence": 0.9, "latency_ms": 5.0, "outcome": "ok", "text": "a ticket"}
        for i in range(n)])


def _metrics(port: int, name: str) -> list[str]:
    import httpx

    lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
    return [line for line in lines if line.startswith(name + "{")]


def test_the_controller_actor_killed_mid_retrain_resumes_the_same_job(loop):
    import ray
    from ray.job_submission import JobStatus

    from cluster.loop import actor, control, statuses

    settings, registry, controller = loop
    registry.set_alias(MODEL, CHALLENGER, None)
    settings.controller.interval_s = 1.0
    log_served(settings, registry, "new-product", 120, 100)
    handle = actor(settings, MODEL, start=True)
    try:
        state = control(settings, MODEL, "retrain_now")
        assert state["state"] == "retraining"
        client = controller.job_client()
        def running() -> bool:
            try:
                return client.get_job_status(state["retrain_id"]) == JobStatus.RUNNING
            except RuntimeError:
                return False  # not submitted yet

        wait_for("the retrain job to run", running, 120)
        ray.kill(handle, no_restart=False)  # Ray starts the actor again; it resumes from the store
        after = wait_for("the retrain to end", lambda: (
            s := _actor_state(settings))["state"] != "retraining" and s, 420, every_s=1)
        assert after["state"] in ("evaluating", "canary", "rejected", "serving"), after
        assert after["retrain_id"] == state["retrain_id"] and after["challenger"] == 3
        assert registry.find_version(MODEL, "llmops.retrain_id", state["retrain_id"]) == 3
        status = wait_for("the job's driver to exit (a moment after registering)", lambda: (
            s := client.get_job_status(state["retrain_id"])) != JobStatus.RUNNING and s, 60)
        assert status == JobStatus.SUCCEEDED
        jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith("retrain-")
                and j.submission_id == state["retrain_id"]]
        assert len(jobs) == 1  # resumed, not submitted again
        moves = [(e["from"], e["to"]) for e in controller.events()]
        assert moves[:2] == [("serving", "retraining"), ("retraining", "evaluating")]
        assert registry.alias_version(MODEL, CHAMPION) == 1
        # `llmops controller status`: the store and the dashboard's actor list, no driver
        [status] = statuses(settings, [MODEL], 2).values()
        assert status["running"] and status["state"]["retrain_id"] == state["retrain_id"]
        assert len(status["events"]) == 2 and all(e in controller.events()
                                                  for e in status["events"])
    finally:
        ray.kill(actor(settings, MODEL) or handle)


def test_the_controller_actor_killed_mid_canary_judges_the_same_canary_and_promotes_once(loop):
    """The canary's state (challenger, start) is in the store and its evidence in the inference
    log, so the restarted actor goes on judging the same canary; the transitions reach Ray's
    metrics export port."""
    import ray

    from cluster.loop import actor

    settings, registry, controller = loop
    settings.controller.interval_s = 1.0
    settings.controller.canary = CanaryPolicy(min_requests=150)
    started = time.time()
    controller.store.save(ControllerState(model=MODEL, state="canary", champion=1, challenger=2,
                                          retrain_id="r-canary", canary_started=started))
    _canary_traffic(settings, "champion", 400)
    _canary_traffic(settings, "challenger", 100)
    handle = actor(settings, MODEL, start=True)
    try:
        wait_for("the canary's first 100 requests", lambda: "100 of 150" in _actor_state(
            settings)["detail"].get("waiting", ""), 60, detail=lambda: _actor_state(settings))
        ray.kill(handle, no_restart=False)  # Ray starts it again; it resumes from the store
        _canary_traffic(settings, "challenger", 60, start=100)
        deadline = time.monotonic() + 90
        while (state := _actor_state(settings))["state"] != "serving":
            assert time.monotonic() < deadline and state["state"] in ("canary", "promoting"), state
            time.sleep(0.5)
        assert state["champion"] == 2 and state["previous_champion"] == 1
        assert state["detail"]["canary"]["challenger"]["requests"] == 160
        assert [(e["from"], e["to"]) for e in controller.events()] == [
            ("canary", "promoting"), ("promoting", "serving")]  # one decision, one promotion
        assert registry.alias_version(MODEL, CHAMPION) == 2 and \
            registry.alias_version(MODEL, PREVIOUS) == 1
        port = ray.nodes()[0]["MetricsExportPort"]
        deadline, wanted = time.monotonic() + 60, {
            "ray_llmops_controller_state": 'state="serving"',
            "ray_llmops_controller_transitions_total": 'from="canary"'}
        while wanted and time.monotonic() < deadline:
            wanted = {name: label for name, label in wanted.items() if not any(
                f'model="{MODEL}"' in line and label in line for line in _metrics(port, name))}
            time.sleep(2)
        assert not wanted, wanted
        serving = [line for line in _metrics(port, "ray_llmops_controller_state")
                   if 'state="serving"' in line and f'model="{MODEL}"' in line]
        assert any(line.endswith(" 1.0") for line in serving), serving
    finally:
        ray.kill(actor(settings, MODEL) or handle)


def test_a_retrain_lost_with_the_cluster_is_submitted_again_and_a_stopped_one_abandoned(loop):
    """After the whole cluster restarts, Ray's job table is empty: the controller submits the
    retrain again under the same id (from the same stored data); a job that is stopped ends in
    `rejected`, then serving, with the champion untouched."""
    settings, registry, controller = loop
    registry.set_alias(MODEL, CHALLENGER, None)
    log_served(settings, registry, "new-product", 120, 100)
    state = controller.retrain_now()
    client = controller.job_client()
    with pytest.raises(RuntimeError):
        client.get_job_status(state.retrain_id)  # as after a cluster restart: no such job
    assert controller.step().state == "retraining"  # submitted now
    assert client.get_job_info(state.retrain_id).submission_id == state.retrain_id
    client.stop_job(state.retrain_id)
    deadline = time.monotonic() + 120
    while (state := controller.step()).state == "retraining":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert state.state == "rejected" and "stopped" in controller.events()[-1]["reason"]
    state = controller.step()
    assert state.state == "serving" and state.champion == 1 and state.challenger is None
    assert registry.alias_version(MODEL, CHAMPION) == 1


def test_the_controller_actor_answers_reads_beside_a_step_and_commands_after_it(loop):
    """The state and the events answer while a step runs (one that fits a teacher takes
    minutes), and an event line still being appended is not read; a command waits for the
    step to end."""
    import threading

    from cluster.loop import ControllerActor

    settings, registry, controller = loop
    actor = ControllerActor(settings.model_dump_json(), MODEL)
    actor.stop()  # its own steps end: the test holds the lock as a step does
    controller.store.append_event({"ts": time.time(), "model": MODEL, "from": "serving",
                                   "to": "drift_suspected", "reason": "a drift"})
    events = controller.events()
    with open(f"{settings.controller_uri}/{MODEL}.events.jsonl", "a") as f:
        f.write('{"ts": 1, "model"')  # the next transition, half written

    def answered(method: str) -> list:  # what the actor answered within 30 s
        out = []
        call = threading.Thread(target=lambda: out.append(actor.call(method)), daemon=True)
        call.start()
        call.join(30)
        return out

    with actor.lock:
        [state], [read] = answered("state"), answered("events")
        assert state["state"] == "serving" and read == events and len(events) == 1
        command = threading.Thread(target=actor.call, args=("step",))
        command.start()
        command.join(2)
        assert command.is_alive()  # waits for the step
    command.join(120)
    assert not command.is_alive()
