"""The closed-loop controller against a real MLflow registry and the session's Ray: the gate, the
canary verdict and the retraining set as functions; then the state machine resumed from stored
states (a worse challenger rejected, manual promotion and rollback, refusals that change
nothing) and a retrain that runs as a real Ray job (Ray Train + DeepSpeed) and registers a
challenger."""

import json
import time

import pandas as pd
import pytest
from conftest import free_port, register_quick, tiny_settings, wait_for

from cluster.canary import canary_verdict
from cluster.controller import PREVIOUS, Controller, Refused
from cluster.demo import quality
from cluster.settings import CanaryPolicy
from cluster.state import ControllerState
from monitoring.config import LogConfig
from monitoring.drift import DriftReport, check_model
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now
from serve_apps.apps import pinned_user_config
from training.config import GateConfig, RetrainConfig
from training.data import generate
from training.errors import InvalidData
from training.registry import (
    CHALLENGER,
    CHAMPION,
    FALLBACK,
    GOLDEN_FILE,
    PRIORS_TAG,
    REFERENCE_FILE,
    Registry,
)
from training.retrain import ORIGINAL, RECENT, gate, retraining_data
from training.taskdata import TaskData

MODEL = "support-router"


def test_gate_needs_a_gain_on_recent_traffic_and_no_loss_on_the_original():
    cfg = GateConfig(margin=0.02, tolerance=0.02)
    champion = {RECENT: 0.70, ORIGINAL: 0.90}
    assert gate(champion, {RECENT: 0.80, ORIGINAL: 0.89}, cfg).promote
    small = gate(champion, {RECENT: 0.71, ORIGINAL: 0.95}, cfg)
    assert not small.promote and "below the margin" in small.reason
    forgot = gate(champion, {RECENT: 0.95, ORIGINAL: 0.85}, cfg)
    assert not forgot.promote and "over the tolerance" in forgot.reason
    assert forgot.champion == champion and forgot.challenger[ORIGINAL] == 0.85


def _rows(side: str, n: int, *, error: float = 0.0, latency: float = 10.0, confidence: float = 0.9,
          right: float = 0.9, labelled: int = 0) -> pd.DataFrame:
    """`n` log rows of one side; of the first `labelled`, a share `right` labelled as predicted."""
    k_err, k_right = round(n * error), round(labelled * right)
    return pd.DataFrame({
        "variant": side, "outcome": ["ok"] * (n - k_err) + ["error"] * k_err,
        "latency_ms": latency, "confidence": confidence, "prediction": "a",
        "label": ["a"] * k_right + ["b"] * (labelled - k_right) + [None] * (n - labelled)})


def test_canary_verdict_compares_the_challenger_with_the_champion_over_the_same_period():
    policy = CanaryPolicy(min_requests=100)
    champion = _rows("champion", 400, labelled=40)
    verdict, reason, stats = canary_verdict(pd.concat([champion, _rows("challenger", 99)]), policy)
    assert verdict is None and "99 of 100" in reason
    same = pd.concat([champion, _rows("challenger", 100, labelled=40)])
    assert canary_verdict(same, policy)[0] is True
    for challenger, why in [(_rows("challenger", 100, error=0.05), "error rate"),
                            (_rows("challenger", 100, latency=16.0), "p50 latency"),
                            (_rows("challenger", 100, confidence=0.8), "confidence"),
                            (_rows("challenger", 100, right=0.7, labelled=40), "feedback accuracy")]:
        verdict, reason, _ = canary_verdict(pd.concat([champion, challenger]), policy)
        assert verdict is False and why in reason, reason
    # a shadowing challenger's answers are judged the same way
    shadow = _rows("challenger", 100, right=0.7, labelled=40).assign(variant="shadow")
    verdict, reason, stats = canary_verdict(pd.concat([champion, shadow]), policy)
    assert verdict is False and "feedback accuracy" in reason
    assert stats["challenger"]["requests"] == 100
    # a drop past the allowance but within chance at 40 labels a side is no evidence
    close = canary_verdict(pd.concat([champion, _rows("challenger", 100, right=0.85,
                                                      labelled=40)]), policy)
    assert close[0] is True and close[2]["challenger"]["accuracy"] < 0.9 - policy.max_accuracy_drop
    # 20 labels are too few to judge accuracy by
    few = canary_verdict(pd.concat([champion, _rows("challenger", 100, right=0.7, labelled=20)]),
                         policy)
    assert few[0] is True and few[2]["challenger"]["labelled"] == 20


def test_a_corrupt_state_file_is_moved_aside_and_the_loop_starts_from_serving(tmp_path):
    from cluster.state import StateStore

    store = StateStore(str(tmp_path / "controller"))
    store.save(ControllerState(model=MODEL, state="canary", champion=1, challenger=2))
    assert store.load(MODEL).state == "canary"
    path = tmp_path / "controller" / f"{MODEL}.json"
    path.write_text(path.read_text()[:40])  # a torn write
    assert store.load(MODEL) is None
    [aside] = (tmp_path / "controller").glob(f"{MODEL}.json.corrupt-*")
    assert aside.read_text().startswith("{") and not path.exists()
    store.save(ControllerState(model=MODEL))
    assert store.load(MODEL).state == "serving"
    assert not list((tmp_path / "controller").glob(".*.tmp"))  # nothing half-written left


def test_retraining_set_mixes_labelled_recent_traffic_with_a_replay_sample(tmp_path):
    recent = generate("support-tickets", "new-product", 120, seed=1)[["text", "label"]]
    recent.loc[100:, "label"] = None  # answered, never labelled
    reference = generate("support-tickets", "base", 2000, seed=2)
    golden = generate("support-tickets", "base", 50, seed=3)
    config = RetrainConfig(min_labelled=60, recent_holdout_share=0.3, recent_repeats=2,
                           replay_rows=500, validation_rows=100)
    data = retraining_data(recent, reference, golden, config)
    assert len(data.holdouts[RECENT]) == 30 and data.holdouts[ORIGINAL].equals(
        golden[["text", "label"]])
    assert len(data.train) + len(data.validation) == 500 + 70 * 2 and len(data.validation) == 100
    mix = pd.concat([data.train, data.validation])
    assert not set(data.holdouts[RECENT].text) & set(mix.text)  # held out means held out
    assert mix.text.isin(recent.text).sum() == 140 and mix.label.notna().all()
    # replayed rows keep their provenance (the support pipeline's resolved tickets come from it)
    replayed = mix[~mix.text.isin(recent.text)]
    assert replayed.intent.notna().all() and (replayed.scenario == "base").all()
    back = TaskData.load(data.save(tmp_path / "d"))
    assert back.train.equals(data.train) and back.holdouts.keys() == data.holdouts.keys()
    with pytest.raises(InvalidData, match="59 labelled recent requests"):
        retraining_data(recent.iloc[:59], reference, golden, config)


@pytest.fixture
def loop(ray_session, tmp_path):
    """A registry with a good champion (v1) and a worse challenger (v2) of the router, and
    settings that reach the session's Ray dashboard (no Serve application runs)."""
    settings = tiny_settings(tmp_path / "state")
    settings.ray.dashboard_port = int(ray_session.dashboard.rsplit(":", 1)[1])
    settings.training.use_gpu = "no"  # the session's GPUs are logical ones
    settings.training.retrain = RetrainConfig(min_labelled=40, replay_rows=192,
                                              validation_rows=32)
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, MODEL, epochs=8)
    register_quick(settings, registry, MODEL, epochs=1, lr=1e-6)
    return settings, registry, Controller(settings, MODEL, registry)


def _served(settings, registry, scenario: str, n: int, labelled: int, version: int = 1,
            priors: dict | None = None, seed: int = 11) -> None:
    """What serving writes for n requests answered by `version` (adjusted to `priors`): log
    records with the features drift checks read and the (redacted) text, and feedback labels
    for the first `labelled`."""
    from serve_apps.model import load

    df = generate("support-tickets", scenario, n, seed=seed)
    out = load(f"models:/{MODEL}/{version}", registry.tracking_uri).classify(list(df.text),
                                                                            priors=priors)
    writer = SegmentWriter(settings.log_uri, INFERENCE, LogConfig())
    ts = now()
    writer.write_segment([
        {"request_id": f"q{seed}-{i}", "item": 0, "ts": ts, "tenant": "default",
         "application": "support",
         "model": MODEL, "model_version": str(version), "variant": "champion",
         **out[i]["features"], "prediction": out[i]["label"],
         "confidence": float(out[i]["confidence"]), "latency_ms": 5.0, "outcome": "ok",
         "text": df.text[i]} for i in range(n)])
    if labelled:
        SegmentWriter(settings.log_uri, FEEDBACK, LogConfig()).write_segment([
            {"request_id": f"q{seed}-{i}", "item": 0, "label": df.label[i], "ts": ts,
             "tenant": "default"} for i in range(labelled)])


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


def test_clean_traffic_never_starts_a_retrain(loop):
    settings, registry, controller = loop
    controller.state()  # it watches traffic from now on
    _served(settings, registry, "base", 1500, 300)  # three full windows, labelled as predicted
    for _ in range(3):
        assert controller.step().state == "serving"
    assert controller.events() == [] and controller.state().retrain_id is None


@pytest.fixture
def accurate(ray_session, tmp_path):
    """A registry whose router is accurate enough (about 0.93) for its posteriors to say
    something about the traffic: more rows and epochs than the loop's (about 12 s)."""
    settings = tiny_settings(tmp_path / "state")
    settings.ray.dashboard_port = int(ray_session.dashboard.rsplit(":", 1)[1])
    task = settings.training.tasks[MODEL]
    settings.training.tasks[MODEL] = task.model_copy(update={
        "train_size": 1200, "holdout_size": 300,
        "model": task.model.model_copy(update={"freeze_embeddings": False})})
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, MODEL, epochs=10)
    return settings, registry, Controller(settings, MODEL, registry)


def test_a_label_shift_is_answered_with_new_priors_then_confirmed_or_refuted_by_labels(accurate):
    settings, registry, controller = accurate
    controller.store.save(ControllerState(model=MODEL, state="drift_suspected", champion=1,
                                          serving_since=time.time() - 1))
    _served(settings, registry, "label-shift", 600, 0)  # unlabelled: only the posteriors
    state = controller.step()
    assert state.state == "reweighted", state.detail
    shift = state.detail["label_shift"]
    assert registry.priors(MODEL, 1) == shift["priors"]  # what drift checks now compare with
    # ... and what a redeploy (`llmops up`) serves v1 with again
    weights = {k: round(q / shift["training"][k], 6) for k, q in shift["priors"].items()}
    served = pinned_user_config(settings.serve.support.classifier, registry.tracking_uri)
    assert served["model"] == f"models:/{MODEL}/1"
    assert served["priors"] == {"version": "1", "weights": weights}
    truth = generate("support-tickets", "label-shift", 600, seed=11).label.value_counts(
        normalize=True)
    def distance(p):
        return 0.5 * sum(abs(p.get(k, 0) - truth.get(k, 0)) for k in set(p) | set(truth))
    assert distance(shift["priors"]) < distance(shift["training"]) / 2
    assert state.retrain_id is None and state.retrain_started == []  # no retrain
    # the adjusted answers, labelled: as accurate as the reference under the new priors
    _served(settings, registry, "label-shift", 80, 40, priors=shift["priors"] and {
        k: q / shift["training"][k] for k, q in shift["priors"].items()}, seed=12)
    state = controller.step()
    assert state.state == "serving" and "confirmed" in controller.events()[-1]["reason"]
    # drift checks compare the shifted traffic with the reference in the new proportions
    def newest_window(priors: dict) -> DriftReport:
        registry.tag_version(MODEL, 1, {PRIORS_TAG: json.dumps(priors)})
        return check_model(settings.log_uri, registry, settings.monitoring.drift, MODEL,
                           window=500).windows[-1]
    assert newest_window({}).drifted and not newest_window(shift["priors"]).drifted
    # the benchmark's figures read the served version as it answers: with its new priors
    figures = quality(registry, "label-shift", 1, 1, error_rate=0.05)
    drifted = figures["drifted_traffic"]
    assert drifted["v1 with its new priors"] > drifted["v1"]
    assert figures["recovered"] == round(drifted["v1 with its new priors"]
                                         / figures["clean_traffic_before_drift"], 3)
    served = figures["served_on_drifted_traffic"]
    assert 0.5 < served["coverage"] < 1 and served["precision"] > drifted["v1"]
    # refuted: labels that disagree with the adjusted answers send the loop to a retrain
    controller.store.save(state.model_copy(update={"state": "reweighted", "since": time.time()}))
    _served(settings, registry, "concept-shift", 60, 60, seed=13)
    state = controller.step()
    assert state.state == "drift_suspected" and "label_shift_refuted" in state.detail
    assert registry.priors(MODEL, 1) is None  # refuted priors are not served
    assert "priors" not in pinned_user_config(settings.serve.support.classifier,
                                              registry.tracking_uri)
    assert [e["to"] for e in controller.events()] == ["reweighted", "serving", "drift_suspected"]
    # a concept shift whose labels came with it is not taken for a label shift: it retrains
    controller.store.save(ControllerState(model=MODEL, state="drift_suspected", champion=1,
                                          serving_since=time.time()))
    _served(settings, registry, "concept-shift", 300, 300, seed=14)
    assert controller.step().state == "retraining"


def test_gate_rejects_a_worse_challenger_and_nothing_is_served_or_moved(loop):
    settings, registry, controller = loop
    _served(settings, registry, "new-product", 80, 80)
    data = retraining_data(
        pd.DataFrame({"text": generate("support-tickets", "new-product", 80, seed=11).text,
                      "label": generate("support-tickets", "new-product", 80, seed=11).label}),
        registry.run_data(MODEL, 1, REFERENCE_FILE), registry.run_data(MODEL, 1, GOLDEN_FILE),
        settings.training.retrain)
    data.save(controller.work / "r-worse" / "data")
    # a controller that stopped after the retrain registered v2 resumes at the gate
    controller.store.save(ControllerState(model=MODEL, state="evaluating", champion=1,
                                          challenger=2, retrain_id="r-worse"))
    state = controller.step()
    assert state.state == "rejected" and "gate" in state.detail
    assert state.detail["gate"]["challenger"][RECENT] < state.detail["gate"]["champion"][RECENT]
    state = controller.step()
    assert state.state == "serving" and state.champion == 1 and state.challenger is None
    assert registry.alias_version(MODEL, CHAMPION) == 1
    assert registry.alias_version(MODEL, CHALLENGER) is None  # never served
    tags = registry.client.get_model_version(MODEL, "2").tags
    assert tags["llmops.gate"] == "rejected" and "below the margin" in tags["llmops.gate.reason"]
    assert [(e["from"], e["to"]) for e in controller.events()] == [
        ("evaluating", "rejected"), ("rejected", "serving")]


def test_manual_commands_refuse_what_cannot_apply_and_change_nothing(loop):
    settings, registry, controller = loop
    registry.set_alias(MODEL, CHALLENGER, None)
    before = controller.state()
    for call, message in [(controller.promote, "no challenger to promote"),
                          (lambda: controller.rollback(99), "no version 99"),
                          (controller.rollback, "no previous champion"),
                          (lambda: controller.rollback(1), "already the champion"),
                          (controller.retrain_now, "0 labelled recent requests")]:
        with pytest.raises(Refused, match=message):
            call()
    controller.store.save(before.model_copy(update={"state": "retraining",
                                                    "retrain_id": "r-running"}))
    with pytest.raises(Refused, match="is retraining"):
        controller.retrain_now()
    with pytest.raises(Refused, match="has no challenger to promote .retraining."):
        controller.promote()
    assert controller.state().retrain_id == "r-running" and controller.events() == []
    assert registry.alias_version(MODEL, CHAMPION) == 1


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
    _served(settings, registry, "base", 1500, 1)
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


def test_every_state_handles_itself_and_moves_only_as_the_table_says(loop):
    from cluster.state import STATES, TRANSITIONS

    settings, registry, controller = loop
    assert set(TRANSITIONS) == set(STATES)
    assert all(set(targets) <= set(STATES) for targets in TRANSITIONS.values())
    state = controller.state()
    with pytest.raises(AssertionError, match="no transition serving -> canary"):
        controller._to(state, "canary", "a jump the loop never makes")
    assert controller.state() == state and controller.events() == []


def test_manual_promotion_then_rollback_move_the_champion_and_record_it(loop):
    settings, registry, controller = loop
    assert controller.promote().champion == 2
    assert registry.alias_version(MODEL, CHAMPION) == 2 and \
        registry.alias_version(MODEL, PREVIOUS) == 1
    state = controller.rollback()
    assert state.state == "serving" and state.champion == 1
    assert registry.alias_version(MODEL, CHAMPION) == 1
    assert [e["to"] for e in controller.events()] == ["promoting", "serving"] * 2
    assert "manual rollback to v1" in controller.events()[2]["reason"]
    assert registry.client.get_model_version(MODEL, "1").tags["llmops.state"] == "serving"


def test_a_promotion_re_distils_the_peak_fallback_of_a_model_that_has_one(loop):
    """The operator opted in (a `fallback` alias); the new champion's student is trained as a
    Ray job while the loop goes on, and aliased once its gate passed."""
    from training.distill import DISTILLED_FROM_TAG

    settings, registry, controller = loop
    task = settings.training.tasks[MODEL]
    task.distill = task.distill.model_copy(update={"layers": 1, "margin": 1.0})
    registry.set_alias(MODEL, FALLBACK, 1)
    state = controller.promote()
    assert state.champion == 2 and state.distill_id.startswith(f"distill-{MODEL}-")
    assert f"re-distilling its peak fallback ({state.distill_id})" in \
        controller.events()[-1]["reason"]
    done = wait_for("the re-distillation job", lambda: (s := controller.step()).distill_id is None
                    and s, 300, every_s=2, detail=lambda: controller.state().detail)
    assert done.state == "serving" and done.detail["distill"]["status"] == "SUCCEEDED"
    student = registry.alias_version(MODEL, FALLBACK)
    assert student == done.detail["distill"]["fallback"] == 3
    assert registry.client.get_model_version(MODEL, "3").tags[DISTILLED_FROM_TAG] == "2"
    assert registry.alias_version(MODEL, CHAMPION) == 2  # the student never serves as champion


def test_a_crash_between_the_alias_move_and_the_swap_is_finished_by_the_next_controller(
        loop, monkeypatch):
    import serve_apps.deploy

    settings, registry, controller = loop

    def killed(*args, **kwargs):
        raise SystemExit("controller killed")

    monkeypatch.setattr(serve_apps.deploy, "swap", killed)
    with pytest.raises(SystemExit):
        controller.promote()
    assert controller.state().state == "promoting"  # the decision was saved before acting
    assert registry.alias_version(MODEL, CHAMPION) == 2  # the alias had moved
    monkeypatch.undo()
    restarted = Controller(settings, MODEL, Registry(settings.registry, settings.data_dir))
    state = restarted.step()
    assert state.state == "serving" and state.champion == 2 and state.previous_champion == 1
    assert registry.alias_version(MODEL, CHAMPION) == 2 and \
        registry.alias_version(MODEL, PREVIOUS) == 1  # one champion, the old one kept as previous
    assert [e["to"] for e in restarted.events()] == ["promoting", "serving"]


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


def test_the_controller_actor_killed_mid_retrain_resumes_the_same_job(loop):
    import ray
    from ray.job_submission import JobStatus

    from cluster.loop import actor, control, statuses

    settings, registry, controller = loop
    registry.set_alias(MODEL, CHALLENGER, None)
    settings.controller.interval_s = 1.0
    _served(settings, registry, "new-product", 120, 100)
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
    _served(settings, registry, "new-product", 120, 100)
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
