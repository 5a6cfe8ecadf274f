"""The whole stack at work (serving_stack.py), last: the closed loop retraining on drift through
a canary to a promotion without failing a request; the metrics it all produced at Ray's export
port and in a real Prometheus with the shipped alerts and dashboard; the log's compactor; a
graceful shutdown losing no logged request; GPU replicas placed and autoscaled."""

import json
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import (
    MONITORING,
    dashboard_exprs,
    exposed,
    free_port,
    referenced_metrics,
    running,
    wait_for,
)
from ray import serve
from serving_stack import (
    SUPPORT_TEXTS,
    flushed,
    llmops,
    llmops_here,
    replica_ids,
)

from cluster.runtime import PLATFORM_ENV
from monitoring.log import FEEDBACK, read
from serve_apps.batch import Item
from serve_apps.config import ServeConfig
from serve_apps.deploy import serve_config
from training.data import generate


def test_closed_loop_retrains_on_drift_canaries_and_promotes_without_failing_a_request(platform):
    """Drift in the served log -> a retrain on feedback labels as a Ray job -> the gate -> a
    canary on live traffic -> promotion with a hot swap, stepped by a controller in the test."""
    from cluster.controller import Controller
    from cluster.settings import load_settings

    settings = load_settings(platform.config, environ=platform.env)
    settings.training.use_gpu = "no"  # the session's GPUs are logical ones
    # the tiny routers answer near chance (macro-F1 about 0.08), where a retrain's gain is noise
    # of the size of the margin (+0.0148 against 0.02 once in CI): the gate's rules are tested
    # in test_retrain.py, the promotion's mechanics here
    settings.training.gate = settings.training.gate.model_copy(
        update={"tolerance": 0.1, "margin": 0.0})
    tasks = dict(settings.training.tasks)  # enough steps for the tiny router to learn the launch
    tasks["support-router"] = tasks["support-router"].model_copy(
        update={"epochs": 6, "learning_rate": 3e-3})
    settings.training.tasks = tasks
    # The tiny routers answer new-product near chance, so their feedback accuracies over ~30
    # labels a side differ by noise: the accuracy rule is tested in test_controller.py.
    settings.controller.canary = settings.controller.canary.model_copy(
        update={"fraction": 0.5, "min_requests": 60, "max_accuracy_drop": 1.0})
    controller = Controller(settings, "support-router", platform.registry)
    assert controller.state().state == "serving"  # it watches traffic from now on
    run = (platform.env, platform.config)
    # labelled at random: the tiny routers' confidence on new-product says nothing, so the
    # label queue's order would only reshuffle noise (its order is tested with the queue)

    def send(n: int, seed: int, feedback: float) -> subprocess.CompletedProcess:
        began = datetime.now(UTC)
        proc = llmops_here(run, "traffic", "support", "--scenario", "new-product", "--n",
                            str(n), "--seed", str(seed), "--feedback", str(feedback),
                            "--labelling", "random", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        flushed(platform, began, n, model="support-router")
        accepted = json.loads(proc.stdout)["feedback"]["accepted"]
        wait_for(f"{accepted} labels in the feedback log", lambda: len(
            read(platform.log_uri, FEEDBACK, since=began)) >= accepted, 30)
        return proc

    sent = [send(300, 50, 0.6)]  # a drift window (250) of the launch, and labels to learn it
    assert json.loads(sent[0].stdout)["feedback"]["accepted"] >= 150, sent[0].stderr[-2000:]
    seen, state = [], controller.step()
    deadline = time.monotonic() + 480
    while state.state not in ("serving", "rejected", "rolled_back") or not seen:
        assert time.monotonic() < deadline, (seen, state)
        seen.append(state.state)
        if state.state == "drift_suspected":  # a retrain learns the labels since the onset
            assert state.drift_onset is not None and state.drift_onset < time.time(), state
        if state.state == "canary":  # live traffic for the canary to be judged on
            sent.append(send(150, 60 + len(sent), 0.5))
        else:
            time.sleep(1)  # a retrain is a Ray job: its status is read again in a second
        state = controller.step()
    assert state.state == "serving" and state.champion == 2, controller.events()
    assert state.drift_onset is None
    assert {"drift_suspected", "retraining", "evaluating", "canary"} <= set(seen)
    assert [e["to"] for e in controller.events()][-2:] == ["promoting", "serving"]
    assert all(p.returncode == 0 and json.loads(p.stdout)["failed"] == 0 for p in sent)
    assert platform.registry.alias_version("support-router", "champion") == 2
    router = platform.cluster.status()["support"]["deployments"]["Classifier"]
    assert router["model"] == "models:/support-router/2" and not router["canary"]
    gate = platform.registry.client.get_model_version("support-router", "2").tags
    assert gate["llmops.gate"] == "accepted"
    # its lineage (OpenLineage events of the retrain, the fine-tune and the promotion): from
    # the served log and the replay, through the fine-tune of v1, to the router and its requests
    shown = llmops_here(run, "lineage", "support-router@2", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    chain = json.loads(shown.stdout)
    assert chain["trained_by"]["state"] == chain["retrain"]["state"] == "COMPLETE"
    assert chain["retrain"]["description"].startswith("drift")
    inputs = {d["name"]: d for d in chain["retrain"]["inputs"]}
    assert inputs["support-router"]["rows"] >= 150
    assert "models:/support-router/1/data/reference.parquet" in inputs
    assert [c["model"] for c in chain["from"]] == ["models:/support-router/1"]
    assert any(d.startswith("support/") for d in chain["deployed"][-1]["deployments"])
    assert chain["served"]["requests"] > 0


def test_metrics_reach_the_ray_metrics_export_port(ray_session, platform):
    """Serve replicas record the platform's metrics; Ray exports them with the `ray_` prefix."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {
        "ray_llmops_requests_total": ('application="moderation"', 'model="moderation"',
                                      'outcome="ok"'),
        "ray_llmops_request_latency_seconds_bucket": ('application="support"',
                                                      'model="support-router"'),
        "ray_llmops_guardrail_actions_total": ('action="rewrite"',),
        "ray_llmops_guardrail_findings_total": ('application="moderation"',
                                                'rule="prompt-injection"', 'action="flag"'),
        "ray_llmops_degraded_answers_total": ('application="chat"', 'reason="TimeoutError"'),
        "ray_llmops_errors_total": ('status="422"',),
        "ray_llmops_abstentions_total": ('application="support"', 'model="support-router"'),
        "ray_llmops_batch_size_bucket": ('deployment="Classifier"', 'model="moderation"'),
        "ray_llmops_model_batch_seconds_count": ('model="support-reply"',),
        "ray_llmops_model_info": ('model="moderation"', 'variant="champion"'),
    }
    # Every Ray-exported metric the Grafana dashboard and the alert rules query must exist too;
    # both are awaited (a gauge the controller set a moment ago reaches the export port with
    # the next report).
    referenced = referenced_metrics("ray_")
    def absent() -> tuple[list[str], set[str], set[str]]:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        return lines, {name for name, labels in wanted.items() if not any(
            line.startswith(name + "{") and all(lab in line for lab in labels) for line in lines)
        }, {m for m in referenced if not exposed(m, lines)}

    wait_for("every metric at the export port", lambda: not any(absent()[1:]), 60, every_s=1,
             detail=lambda: absent()[1:])
    lines = absent()[0]
    info = [line for line in lines if line.startswith("ray_llmops_model_info{")
            and 'model="moderation"' in line and line.endswith(" 1.0")]
    assert info  # the version in service is marked 1


def test_a_real_prometheus_scrapes_the_stack_fires_alerts_and_answers_the_dashboard(
        ray_session, platform, tmp_path):
    """Debian's `prometheus` with the shipped scrape config and alert rules (only the discovery
    file, the monitor's port and the intervals changed) scrapes every Ray node and the monitor
    `llmops up` started; the degraded health check of `test_monitor_...` fires its alert, every
    rule evaluates without error, and every Grafana query evaluates over series that exist (a
    ratio of errors, or an annotation's `> 0`, may rightly select nothing). A query is judged
    over a minute of evaluations, not one instant: a gauge the replicas re-mark every few
    seconds is stale at an instant when Ray's export to its agent ran late (busy cores)."""

    import ray

    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus package is not installed (make install installs it)")
    shipped = MONITORING / "prometheus"
    config = yaml.safe_load((shipped / "prometheus.yml").read_text())
    # a 1 s interval bounds a scrape at 1 s: Ray's export port, busy, answered later than that
    # (every query of a run's dashboard empty); the interval bounds its timeout
    config["global"] = {"scrape_interval": "3s", "scrape_timeout": "3s",
                        "evaluation_interval": "1s"}
    config["rule_files"] = [str(shipped / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    discovery = Path(ray._private.worker._global_node.get_session_dir_path()) / \
        "prom_metrics_service_discovery.json"
    jobs["ray"]["file_sd_configs"][0]["files"] = [str(discovery)]
    monitor = json.loads(llmops((platform.env, platform.config), "status", "--json").stdout)
    jobs["llmops-monitor"]["static_configs"][0]["targets"] = [
        monitor["monitor"]["metrics"].split("//")[1].split("/")[0]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    api = f"http://127.0.0.1:{port}/api/v1"

    def get(path: str, **params) -> dict:
        answer = httpx.get(f"{api}/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", (path, params, answer)
        return answer["data"]

    try:
        deadline = time.monotonic() + 120
        while True:  # ready: its storage is open and its API answers (503 text before that)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline and server.poll() is None, server.stderr
            time.sleep(0.5)
        targets, firing = [], set()
        while True:
            try:
                targets = get("targets")["activeTargets"]
                firing = {a["labels"]["alertname"] for a in get("alerts")["alerts"]
                          if a["state"] == "firing"}
                if {t["labels"]["job"] for t in targets if t["health"] == "up"} == \
                        {"ray", "llmops-monitor"} and "LLMOpsHealthcheckFailed" in firing:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, (targets, firing)
            time.sleep(1)
        rules = [r for g in get("rules")["groups"] for r in g["rules"]]
        assert len(rules) >= 14 and all(r["health"] == "ok" for r in rules), \
            [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        queries = [expr.replace("$__rate_interval", "1m").replace("$application", ".*")
                   .replace("$model", ".*") for expr in dashboard_exprs()]
        names = {name for query in queries
                 for name in re.findall(r"\b(?:ray_)?llmops_[a-z_]+|ray_serve_[a-z_]+", query)}
        missing = names
        empty = [q for q in queries  # those select what may not have happened
                 if not re.search(r'outcome="error"| > 0$', q)]
        deadline = time.monotonic() + 60  # a target just up: its series come with its scrapes
        while (empty or missing) and time.monotonic() < deadline:
            time.sleep(1)  # two scrapes at least for every rate()
            missing = {name for name in missing if not get("series", **{"match[]": name})}
            empty = [q for q in empty if not get("query", query=q)["result"]]
        assert empty == [] and missing == set(), [
            (t["labels"]["job"], t["health"], t["lastError"], t["lastScrapeDuration"])
            for t in get("targets")["activeTargets"]]
    finally:
        server.terminate()
        server.wait(30)


def test_the_log_has_one_compactor_that_merges_its_small_segments(ray_session, platform):
    """The replicas started the log's compactor; with a pass now (its own run every minute
    through this module), the hundreds of segments the flushes wrote are about one per day, and
    every record stays readable once."""
    import ray

    from monitoring.singleton import NAMESPACE, keyed

    folder = Path(platform.log_uri) / "inference"
    before = read(platform.log_uri)
    compactor = ray.get_actor(keyed("llmops-log-compactor", platform.log_uri), namespace=NAMESPACE)
    done = ray.get(compactor.compact.remote())
    assert done["merged"] >= 2 * done["written"]
    segments = [p for p in folder.rglob("*.parquet") if not p.name.startswith(".")]
    assert len(segments) <= 2 * len({p.parent for p in segments})  # a flush may land meanwhile
    after = read(platform.log_uri)
    assert set(before.request_id) <= set(after.request_id)
    assert not after.duplicated(["request_id", "item", "model", "variant"]).any()


def test_at_a_peak_the_students_classify_and_no_generator_is_waited_for(platform):
    """Moderation and support with a peak fallback that turns on at two requests in flight (its
    student here is the champion's own version; `llmops distill` trains a smaller one), turned
    on in place (user_config: no replica replaced): what the fallback answered hides a toxic
    post (moderation) or suggests the closest resolved ticket's reply (support), `degraded`,
    without calling the generator; a request before the peak was generated. Chat, which has no
    classifier, switches on its generator's fallback: its student writes the answers of a peak,
    streams included. It leaves them so: the tests after it need support's answers logged, then
    replace the applications."""
    from cluster.platform import generated_serve_config
    from cluster.settings import load_settings
    from serve_apps.model_config import PeakFallbackConfig

    before = platform.cluster.deployed_config()
    settings = load_settings(platform.config)
    for stage, model in ((settings.serve.moderation.classifier, "moderation"),
                         (settings.serve.support.classifier, "support-router"),
                         (settings.serve.chat.generator, "rewriter")):
        stage.fallback = PeakFallbackConfig(
            model=f"models:/{model}@champion", enter_ongoing=2, exit_ongoing=1, min_on_s=60,
            enter_p95_ms=60_000, exit_p95_ms=30_000)  # in flight decides, not a slow machine
    peaked = {app["name"]: app for app in generated_serve_config(
        settings, platform.registry, 0)["applications"]}  # the other applications unchanged
    switched = ("moderation", "support", "chat")
    serving = replica_ids(platform, switched)
    platform.cluster.deploy({**before, "applications": [
        peaked[app["name"]] if app["name"] in switched else app
        for app in before["applications"]]})
    assert replica_ids(platform, switched) == serving
    toxic = list(generate("moderation", "base", 12, seed=5, priors={"toxic": 1.0}).text)

    def ask(route: str, text: str) -> dict:
        r = httpx.post(f"{platform.url}{route}", json={"text": text}, headers=platform.auth,
                       timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    for route, texts in (("/v1/moderate", toxic), ("/v1/support/route", SUPPORT_TEXTS * 2)):
        for text in texts[:4]:  # one at a time: no peak; a post the classifier finds toxic
            calm = ask(route, text)
            assert calm["served_by"] is None, calm
            if route == "/v1/support/route" or calm["results"][0]["verdict"] == "toxic":
                break
        if route == "/v1/moderate":  # rewritten by the generator
            assert calm["results"][0]["action"] == "rewrite", calm
            assert "generator" in calm["results"][0]["models"] and not calm["degraded"]
        with ThreadPoolExecutor(len(texts)) as pool:
            burst = list(pool.map(lambda t, r=route: ask(r, t), texts))
        peak = [out for out in burst if out["served_by"] == "fallback"]
        assert peak, [out["served_by"] for out in burst]
        for out in peak:
            [result] = out["results"]
            assert out["degraded"] and "generator" not in result["models"], out
            assert result["models"]["classifier" if route == "/v1/moderate" else "router"][
                "variant"] == "fallback"
            if route == "/v1/support/route":
                assert result["suggestion"]["source"] == "retrieval"
            elif result["verdict"] == "toxic":
                assert (result["action"], result["safe_text"]) == ("block", None), result

    def chat(text: str, stream: bool = False) -> dict:
        """A completion's `llmops` meta (a stream's: its last chunk's) and its text."""
        r = httpx.post(f"{platform.url}/v1/chat/completions", headers=platform.auth, json={
            "model": "rewriter", "messages": [{"role": "user", "content": text}],
            "max_tokens": 8, "stream": stream}, timeout=120)
        assert r.status_code == 200, r.text
        if not stream:
            return {**r.json()["llmops"], "text": r.json()["choices"][0]["message"]["content"]}
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        return {**chunks[-1]["llmops"], "text": "".join(
            c["choices"][0]["delta"].get("content", "") for c in chunks)}

    calm = chat(toxic[0])
    assert (calm["served_by"], calm["degraded"], calm["model"]["variant"]) == (
        None, False, "champion")
    with ThreadPoolExecutor(len(toxic)) as pool:
        burst = list(pool.map(chat, toxic))
    peak = [out for out in burst if out["served_by"] == "fallback"]
    assert peak, [out["served_by"] for out in burst]
    assert all(out["degraded"] and out["model"]["variant"] == "fallback" for out in peak)
    # on for `min_on_s`: a stream right after is the student's too, word for word the
    # champion's here (the same version)
    streamed = chat(toxic[0], stream=True)
    assert (streamed["served_by"], streamed["degraded"]) == ("fallback", True), streamed
    assert streamed["model"]["variant"] == "fallback" and streamed["text"] == calm["text"]


def test_log_survives_a_graceful_shutdown(platform):
    """Requests answered just before their application is deleted are all in the log."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.post(
            f"{platform.url}/v1/support/route", json={"text": SUPPORT_TEXTS[0]},
            headers=platform.auth, timeout=60), range(24)))
    assert [a.status_code for a in answers] == [200] * 24
    ids = [a.json()["request_id"] for a in answers]
    serve.delete("support")  # drains, then each replica's __del__ flushes its buffer
    log = read(platform.log_uri, model="support-router")  # (each reply is a record too)
    assert sorted(log[log.request_id.isin(ids)].request_id) == sorted(ids)


def test_gpu_replicas_are_placed_and_autoscale(ray_session, platform):
    """Runs last: replaces the applications with one whose classifier asks for half a GPU."""
    import ray

    config = ServeConfig.model_validate({
        "port": int(platform.url.rsplit(":", 1)[1]), "use_gpu": "yes",
        "support": {"enabled": False}, "chat": {"enabled": False}, "advisor": {"enabled": False},
        "moderation": {
            "classifier": {"model": "models:/moderation@champion",
                           "resources": {"num_cpus": 0.1, "num_gpus": 0.5},
                           "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
                           "autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                           "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                           "downscale_delay_s": 2, "look_back_period_s": 2}},
            "generator": {"model": "models:/rewriter@champion", "resources": {"num_gpus": 0.5},
                          "autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                          "downscale_delay_s": 1, "look_back_period_s": 2}}}})
    cluster = platform.cluster
    cluster.deploy(serve_config(config, platform.registry.tracking_uri, True, dict(PLATFORM_ENV)),
                   timeout_s=300)
    replicas = lambda: cluster.status()["moderation"]["deployments"]["Classifier"]["replicas"]  # noqa: E731
    assert replicas() == {"RUNNING": 1}
    handle = serve.get_deployment_handle("Classifier", "moderation")
    assert handle.identity.remote().result()["gpu_ids"]  # Ray gave the replica a GPU
    gpus_in_use = lambda: 2 - ray.available_resources().get("GPU", 0)  # noqa: E731

    stop = threading.Event()

    def hammer() -> None:  # 8 requests in flight: 8x the target, light enough on two cores
        while not stop.is_set():  # for the new replica to start
            [r.result() for r in [handle.predict.remote(Item(f"t{i}", f"g{i}")) for i in range(8)]]

    with running(stop, hammer):
        scaled = wait_for("a second classifier replica", lambda: (
            n := replicas().get("RUNNING", 0)) >= 2 and n, 120, every_s=0.5)
        gpus_at_peak = gpus_in_use()
    assert scaled >= 2 and gpus_at_peak >= 1.0  # each classifier replica holds half a GPU
    wait_for("one replica when idle", lambda: replicas() == {"RUNNING": 1}, 120, every_s=0.5)
    generator = lambda: cluster.status()["moderation"]["deployments"]["Generator"]["replicas"]  # noqa: E731
    # min_replicas 0: the idle generator scaled to zero
    wait_for("the idle generator scaled to zero", lambda: generator() == {}, 120, every_s=0.5)
    # a stopped replica's actor gives its GPU back a moment later: one classifier's half GPU
    wait_for("the GPUs back", lambda: gpus_in_use() == pytest.approx(0.5), 60, every_s=0.5)
