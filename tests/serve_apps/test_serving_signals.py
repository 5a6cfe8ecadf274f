"""What the stack tells (serving_stack.py): JSON log lines with the request id, every request in
the inference log with its feedback and the label queue, degraded answers once the generator's
breaker opens (left open: later tests need support's router only), drift checked on the served
log, the health check and the monitor's Prometheus metrics."""

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from conftest import (
    exposed,
    free_port,
    referenced_metrics,
    wait_for,
)
from ray import serve
from serving_stack import (
    SUPPORT_TEXTS,
    flushed,
    llmops,
    llmops_here,
    logged,
    replica_ids,
)

from cluster import views
from monitoring.config import MonitoringConfig
from monitoring.drift import check_model
from monitoring.feedback import UnknownRequest
from monitoring.log import FEEDBACK, read, with_feedback
from serve_apps.apps import ingress_options
from serve_apps.config import ChatAppConfig, OverloadConfig
from serve_apps.pii import redact
from training.data import generate
from training.data.support import RESOLUTIONS


def test_replicas_log_json_lines_carrying_the_platform_request_id(platform):
    """`monitoring.logging` defaults to JSON: every line of the replicas' Serve logs parses, with
    the logger, the Serve context and, on the platform's line per request, its own fields."""
    import ray

    ok = httpx.post(f"{platform.url}/v1/moderate", json={"texts": ["nice photo, thanks"]},
                    headers=platform.headers(X_Request_ID="json-log-1"), timeout=60)
    refused = httpx.post(f"{platform.url}/v1/moderate", json={"texts": ["hi"]},
                         headers={"Authorization": "Bearer not-a-token"}, timeout=60)
    assert ok.status_code == 200 and refused.status_code == 401
    rid = ok.json()["request_id"]
    folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    def lines() -> list[dict]:
        return [json.loads(line) for f in folder.glob("replica_moderation_*.log")
                for line in f.read_text().splitlines()]  # raises if a line is no JSON

    [line] = wait_for("the request's log line", lambda: [
        r for r in lines() if r.get("llmops_request_id") == rid], 30, every_s=0.5)
    lines = lines()
    assert line["tenant"] == "tests" and line["outcome"] == "ok" and line["status"] == 200
    assert line["correlation_id"] == "json-log-1" == line["request_id"]  # Serve's: X-Request-ID
    assert {"asctime", "levelname", "name", "message", "application", "deployment", "replica",
            "latency_ms"} <= set(line) and line["application"] == "moderation"
    assert any(r.get("status") == 401 and r.get("outcome") == "refused" for r in lines)
    access = [r for r in lines if r.get("request_id") == "json-log-1" and r is not line]
    assert access, "Serve's access log line of the request"


def test_every_request_is_logged_and_feedback_joins_it(platform):
    began = datetime.now(UTC).isoformat()
    texts = list(generate("moderation", "base", 20, seed=21).text)
    ids, rewritten = [], {}
    for text in texts:
        r = httpx.post(f"{platform.url}/v1/moderate", json={"text": text},
                       headers=platform.auth, timeout=60)
        assert r.status_code == 200
        ids.append(r.json()["request_id"])
        if r.json()["results"][0]["action"] == "rewrite":
            rewritten[ids[-1]] = r.json()["results"][0]["safe_text"]
    assert set(rewritten) - {ids[0], ids[3]}  # toxic posts among them, rewritten
    multi = httpx.post(f"{platform.url}/v1/support/route", json={"texts": SUPPORT_TEXTS[:3]},
                       headers=platform.auth, timeout=60).json()
    chatted = httpx.post(f"{platform.url}/v1/chat/completions", headers=platform.auth, json={
        "model": "rewriter", "messages": [{"role": "user", "content": texts[0]}],
        "max_tokens": 8}, timeout=60).json()
    chat = chatted["llmops"]["request_id"]
    streamed = httpx.post(f"{platform.url}/v1/chat/completions", headers=platform.auth, json={
        "model": "rewriter", "messages": [{"role": "user", "content": texts[0]}],
        "max_tokens": 8, "stream": True}, timeout=60)
    stream = json.loads(streamed.text.split("data: ", 2)[1])["llmops"]["request_id"]
    many, third = multi["request_id"], ids[3]
    log = logged(platform, {*ids, many, chat, stream})
    # N requests in, N records out (one per text), and one more per generated answer a
    # classifier's decision led to (a rewritten post's rewrite, a ticket's reply): the
    # generator's answer, logged (redacted) with its prompt's embedding
    assert len(log) == len(texts) + 5 + len(rewritten) + 3
    rewrites = log[(log.application == "moderation") & (log.model == "rewriter")]
    assert set(rewrites.request_id) == set(rewritten)
    assert all(o == rewritten[r] for r, o in zip(rewrites.request_id, rewrites.output))
    assert all(len(e) == 32 for e in rewrites.embedding)
    mod = log[log.model == "moderation"].set_index("request_id")
    assert (mod.model == "moderation").all() and (mod.model_version == "1").all()
    # a generated answer is logged (redacted) with the embedding of its prompt by the generator
    [answer] = log[log.request_id == chat].itertuples()
    assert answer.model == "rewriter" and len(answer.embedding) == 32
    [again] = log[log.request_id == stream].itertuples()  # a stream's, as the prefill pools it
    assert list(again.embedding) == pytest.approx(list(answer.embedding), abs=1e-4)
    assert answer.output == redact(chatted["choices"][0]["message"]["content"]).text
    assert (mod.outcome == "ok").all() and (mod.latency_ms > 0).all()
    assert all(len(e) == 32 for e in mod.embedding) and (mod.chars > 0).all()
    # the texts are kept with personal data redacted (what retraining on feedback needs)
    assert [mod.text[rid] for rid in ids] == [redact(t).text for t in texts]
    assert any(redact(t).found for t in texts)
    sup = log[(log.request_id == many) & (log.model == "support-router")].sort_values("item")
    assert list(sup.item) == [0, 1, 2]
    assert list(sup.prediction) == [r["label"] for r in multi["results"]]  # the router's own
    assert dict(sup.stages.iloc[0])["router"] == "support-router/1"
    # each ticket's generated reply is the reply generator's answer, suggested or not (an
    # unsure one gave way to retrieval)
    replies = log[(log.request_id == many) & (log.model == "support-reply")].sort_values("item")
    assert list(replies.item) == [0, 1, 2] and all(len(e) == 32 for e in replies.embedding)
    assert replies.output.map(lambda o: isinstance(o, str)).all()
    assert all(o == redact(r["suggestion"]["reply"]).text for o, r in zip(replies.output,
                                                                          multi["results"])
               if r["suggestion"]["source"] == "generator")

    label = "refund" if multi["results"][1]["label"] != "refund" else "billing"
    r = httpx.post(f"{platform.url}/v1/feedback/", headers=platform.auth,
                   json={"request_id": many, "item": 1, "label": label}, timeout=30)
    assert r.status_code == 201, r.text
    handle = serve.get_app_handle("feedback")
    assert handle.submit.remote({"request_id": third, "label": "spam"}, None,
                                platform.principal).result().accepted
    neighbour = {**platform.principal, "tenant": "neighbour"}
    for body, status, message in [
            ({"request_id": "no-such-request", "label": "spam"}, 404, "no logged request"),
            ({"request_id": third, "label": "billing"}, 422, "not one of moderation's labels"),
            ({"request_id": many, "item": 7, "label": "refund"}, 404, "item 7"),
            ({"request_id": third}, 422, "either a label"),
            ({"request_id": third, "label": "spam", "correction": "fine"}, 422, "either a label"),
            ({"request_id": third, "correction": "fine"}, 422, "answers with a label"),
            ({"request_id": chat, "label": "spam"}, 422, "answers with text")]:
        r = httpx.post(f"{platform.url}/v1/feedback/", json=body, headers=platform.auth,
                       timeout=30)
        assert r.status_code == status and message in r.json()["detail"], r.text
    # a generated answer is corrected with its text, stored as the log keeps texts (redacted)
    r = httpx.post(f"{platform.url}/v1/feedback/", headers=platform.auth, json={
        "request_id": chat, "correction": "Please write to jane.doe@example.com instead."},
        timeout=30)
    assert r.status_code == 201 and r.json()["corrected"] and r.json()["label"] is None, r.text
    # a rewritten post takes a label for its classifier and a correction for its rewrite; a
    # ticket a correction of its reply
    post = next(r for r in rewritten if r not in {ids[0], third})  # the queue checks those
    for body in ({"request_id": post, "label": "toxic"},
                 {"request_id": post, "correction": "Please be kinder."},
                 {"request_id": many, "item": 2, "correction": "Reset it from the login page."}):
        r = httpx.post(f"{platform.url}/v1/feedback/", json=body, headers=platform.auth,
                       timeout=30)
        assert r.status_code == 201, r.text
    wait_for("six labels in the feedback log",
             lambda: len(read(platform.log_uri, FEEDBACK)) >= 6, 20)
    feedback = read(platform.log_uri, FEEDBACK)
    joined = with_feedback(logged(platform, {many, third, chat, post}), feedback)
    [fixed] = joined[joined.request_id == chat].itertuples()
    assert fixed.correction == redact("Please write to jane.doe@example.com instead.").text
    assert "jane.doe" not in fixed.correction and not isinstance(fixed.label, str)
    answers = joined[joined.request_id == post].set_index("model")
    assert answers.label["moderation"] == "toxic" and pd.isna(answers.correction["moderation"])
    assert answers.correction["rewriter"] == "Please be kinder."
    assert pd.isna(answers.label["rewriter"])
    ticket = joined[(joined.request_id == many) & (joined.item == 2)].set_index("model")
    assert ticket.correction["support-reply"] == "Reset it from the login page."
    assert pd.isna(ticket.label["support-reply"]) and pd.isna(ticket.correction["support-router"])
    labels = joined[joined.model.isin(["moderation", "support-router"])].set_index(
        ["request_id", "item"]).label
    assert labels[(third, 0)] == "spam" and labels[(many, 1)] == label
    # `llmops traffic chat` asks the chat generator and corrects half its answers: the ones
    # the label queue lists first
    sent = llmops_here((platform.env, platform.config), "traffic", "chat", "--n", "8",
                       "--feedback", "0.5", "--seed", "3", "--json")
    assert sent.returncode == 0, sent.stderr[-2000:]
    report = json.loads(sent.stdout)["feedback"]
    assert json.loads(sent.stdout)["ok"] == 8 and report["labelling"] == "queue"
    assert report["accepted"] == report["sent"] == 4 and sum(report["reasons"].values()) == 4
    assert labels.isna().sum() == 2  # items 0 and 2 of the support request got no label
    # `llmops traffic support` labels the router's answers the queue lists first, not the
    # reply generator's it lists beside them: each of the four tickets once
    since = datetime.now(UTC)
    sent = llmops_here((platform.env, platform.config), "traffic", "support", "--n", "4",
                       "--feedback", "1", "--seed", "4", "--json")
    assert sent.returncode == 0, sent.stderr[-2000:]
    report = json.loads(sent.stdout)["feedback"]
    assert report["accepted"] == report["sent"] == 4, report
    wait_for("four labels", lambda: len(read(platform.log_uri, FEEDBACK, since=since)) >= 4, 20)
    assert read(platform.log_uri, FEEDBACK, since=since).request_id.nunique() == 4
    # `--model support-reply` corrects the replies instead, each with its reference reply
    since = datetime.now(UTC)
    sent = llmops_here((platform.env, platform.config), "traffic", "support", "--model",
                       "support-reply", "--n", "4", "--feedback", "1", "--seed", "5", "--json")
    assert sent.returncode == 0, sent.stderr[-2000:]
    report = json.loads(sent.stdout)["feedback"]
    assert report["accepted"] == report["sent"] == 4, report
    wait_for("four corrections", lambda: len(read(platform.log_uri, FEEDBACK, since=since)) >= 4,
             20)
    fixes = read(platform.log_uri, FEEDBACK, since=since)
    replies = with_feedback(logged(platform, set(fixes.request_id)), fixes)
    replies = replies[replies.model == "support-reply"]
    assert len(replies) == 4 and replies.correction.notna().all(), replies
    assert set(replies.correction) <= {redact(r).text for r in RESOLUTIONS.values()}
    for app, model, message in (("moderation", "rewriter", "chat or support traffic"),
                                ("support", "rewriter", "support's generator is support-reply")):
        refused = llmops_here((platform.env, platform.config), "traffic", app, "--model", model,
                              "--n", "1")
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-500:]
    # another tenant cannot label this tenant's request: 404, as for an unknown one
    with pytest.raises(UnknownRequest, match="no logged request"):
        handle.submit.remote({"request_id": third, "label": "spam"}, None, neighbour).result()
    # the queue of answers awaiting a label: this tenant's, labelled ones gone, least sure first
    r = httpx.get(f"{platform.url}/v1/feedback/pending", params={"limit": 500, "since": began},
                  headers=platform.auth, timeout=30)
    assert r.status_code == 200, r.text
    queue = {(it["request_id"], it["item"], it["model"]): it for it in r.json()}
    assert (many, 0, "support-router") in queue and (ids[0], 0, "moderation") in queue
    assert (many, 1, "support-router") not in queue and (third, 0, "moderation") not in queue
    assert (post, 0, "rewriter") not in queue and (many, 2, "support-reply") not in queue
    assert (many, 0, "support-reply") in queue  # a reply awaiting its correction
    assert queue[(ids[0], 0, "moderation")]["text"] == redact(texts[0]).text
    page = httpx.get(f"{platform.url}/v1/feedback/pending", params={
        "limit": 4, "model": "moderation", "since": began}, headers=platform.auth, timeout=30).json()
    assert len(page) == 4 and {it["model"] for it in page} == {"moderation"}
    assert all(datetime.fromisoformat(it["leased_until"]) > datetime.fromisoformat(began)
               for it in page)  # handed to this token's reviewer
    # the tenant's other reviewer (the handle's principal) is handed none of those items
    assert not {(it["request_id"], it["item"], it["model"]) for it in handle.pending.remote(
        {"limit": 500, "since": began}, None, platform.principal).result()} & set(queue)
    assert not {it["request_id"] for it in handle.pending.remote({"limit": 500}, None,
                                                                   neighbour).result()} & set(ids)
    for params in ({"limit": 0}, {"limit": 100_000}, {"limit": "many"}, {"since": "yesterday"}):
        r = httpx.get(f"{platform.url}/v1/feedback/pending", params=params,
                      headers=platform.auth, timeout=30)
        assert r.status_code == 422 and r.json()["detail"], (params, r.text)


def test_failing_generator_opens_the_breaker_and_the_fallback_answers_degraded(platform):
    """A generator timeout of 1 ms fails every call: chat answers with its fallback reply and
    support with retrieved replies, both marked `degraded`; chat, limited to one request in
    flight and one queued, sheds a burst with 503 and Retry-After. Both settings change in
    place (no replica replaced). It leaves them so: the tests after it need support's router
    only, and chat no more."""
    config = platform.cluster.deployed_config()
    broken = {"failures": 2, "window_s": 60, "cooldown_s": 600, "timeout_s": 0.001}
    shed = {"max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2}
    for app in config["applications"]:
        if app["name"] not in ("chat", "support"):
            continue
        [ingress] = [d for d in app["deployments"] if d["name"].endswith("Pipeline")]
        ingress["user_config"]["breaker"] = broken
        if app["name"] == "chat":  # and chat sheds load past one request and one queued
            ingress.update(ingress_options(OverloadConfig(**shed),
                                           ingress["ray_actor_options"]["num_cpus"]))
    serving = replica_ids(platform, ("chat", "support"))
    platform.cluster.deploy(config)
    assert replica_ids(platform, ("chat", "support")) == serving
    body = {"model": "rewriter", "messages": [{"role": "user", "content": "you idiots"}]}
    for _ in range(3):  # two failures open the breaker; the third is answered at once
        r = httpx.post(f"{platform.url}/v1/chat/completions", json=body,
                       headers=platform.auth, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["llmops"]["degraded"] is True and out["llmops"]["model"] is None
        assert out["choices"][0]["message"]["content"] == ChatAppConfig().fallback_reply
    streamed = httpx.post(f"{platform.url}/v1/chat/completions", json={**body, "stream": True},
                          headers=platform.auth, timeout=60)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
        ChatAppConfig().fallback_reply and events[-1]["llmops"]["degraded"] is True
    with ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(lambda _: httpx.post(f"{platform.url}/v1/chat/completions",
                                                   json=body, headers=platform.auth, timeout=60),
                              range(48)))
    codes = [r.status_code for r in burst]
    assert set(codes) == {200, 503} and codes.count(503) < len(codes), codes
    assert all(r.headers["retry-after"] == "2" for r in burst if r.status_code == 503)
    r = httpx.post(f"{platform.url}/v1/support/route", json={"texts": SUPPORT_TEXTS[:3]},
                   headers=platform.auth, timeout=60)
    assert r.status_code == 200 and r.json()["degraded"] is True, r.text
    for res in r.json()["results"]:
        assert res["suggestion"]["source"] == "retrieval" and "generator" not in res["models"]
        assert res["suggestion"]["reply"] == RESOLUTIONS[res["suggestion"]["intent"]]


def test_drift_check_on_the_served_log(platform):
    """Clean traffic then new-product traffic through the running stack, checked by the CLI."""
    run = (platform.env, platform.config)

    def send(scenario: str, seed: int, n: int = 250) -> None:
        began = datetime.now(UTC)
        proc = llmops_here(run, "traffic", "support", "--scenario", scenario, "--n", str(n),
                            "--seed", str(seed), "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        sent = json.loads(proc.stdout)
        assert sent["ok"] == n and sent["failed"] == 0 and sent["rps"] > 0
        flushed(platform, began, n, model="support-router")

    send("base", 30, n=20)
    proc = llmops_here(run, "drift", "check", "support-router", "--json")
    assert proc.returncode == 2 and "needs a window of at least 200" in proc.stderr
    send("base", 31)
    clean = llmops_here(run, "drift", "check", "support-router", "--json")
    assert clean.returncode == 0, clean.stderr[-2000:]
    clean = json.loads(clean.stdout)
    assert clean["model"] == "support-router" and clean["version"] == "1"
    assert not clean["drift"], clean["windows"][-1]["metrics"]
    assert Path(clean["windows"][-1]["html"]).is_file()

    send("new-product", 32)
    shifted = json.loads(llmops_here(run, "drift", "check", "support-router", "--json").stdout)
    assert shifted["drift"] and shifted["windows"][-1]["rows"] == 250
    drifted = {m["name"] for m in shifted["windows"][-1]["metrics"] if m["drifted"]}
    assert "share_of_drifted_descriptors" in drifted
    assert "DRIFT" in views.drift(shifted)  # what the command prints without --json
    unknown = llmops_here(run, "drift", "check", "nosuch")
    assert unknown.returncode == 2 and "no requests of 'nosuch'" in unknown.stderr


def test_monitor_and_healthcheck_export_prometheus_metrics(platform):
    """`llmops healthcheck` measures every champion against its registration and writes a
    textfile; `llmops monitor` checks drift, reads the registry and serves all of it."""
    run = (platform.env, platform.config)
    began = datetime.now(UTC)
    sent = llmops_here(run, "traffic", "support", "--scenario", "new-product", "--n", "250",
                        "--seed", "40", "--json")
    assert sent.returncode == 0, sent.stderr[-2000:]
    flushed(platform, began, 250, model="support-router")
    # quality and confidence must equal the registration's; latency on two busy cores swings
    # several-fold from run to run, so its rule is checked apart (the degraded run below)
    tolerant = {**platform.env, "LLMOPS_MONITORING__HEALTH__LATENCY_FACTOR": "50"}
    health = llmops_here((tolerant, platform.config), "healthcheck", "--json")
    assert health.returncode == 0, health.stdout + health.stderr[-2000:]
    report = json.loads(health.stdout)
    assert report["healthy"] and {r["model"] for r in report["results"]} == {
        "moderation", "rewriter", "support-router", "support-reply"}
    assert {c["name"] for c in report["results"][0]["checks"]} >= {"latency_p50_ms", "confidence"}
    slow = {**platform.env, "LLMOPS_MONITORING__HEALTH__LATENCY_FACTOR": "0.001",
            "LLMOPS_MONITORING__HEALTH__LATENCY_SLACK_MS": "0"}
    degraded = llmops_here((slow, platform.config), "healthcheck", "moderation")
    assert degraded.returncode == 1 and "moderation v1: DEGRADED" in degraded.stdout
    assert "latency_p50_ms" in degraded.stdout and Path(report["textfile"]).is_file()

    once = llmops_here(run, "monitor", "--once", "--json")
    assert once.returncode == 0, once.stderr[-2000:]
    out = json.loads(once.stdout)
    check = check_model(platform.log_uri, platform.registry, MonitoringConfig.model_validate(
        yaml.safe_load(platform.config.read_text())["monitoring"]).drift,
        "support-router").to_dict()  # what `llmops drift check` reports
    decision = out["decisions"]["support-router"]
    assert decision["drift"] == check["drift"] and decision["version"] == "1"
    lines = out["metrics"].splitlines()
    detected = f'llmops_drift_detected{{model="support-router",model_version="1"}} ' \
               f'{float(check["drift"])}'
    assert detected in lines
    assert 'llmops_model_alias_version{alias="challenger",model="moderation"} 2.0' in lines
    assert 'llmops_model_versions{model="moderation"} 2.0' in lines
    # the degraded run's textfile, served by the monitor
    assert 'llmops_healthcheck_healthy{model="moderation",model_version="1"} 0.0' in lines
    assert {m for m in referenced_metrics("llmops_") if not exposed(m, lines)} == set()
    # the monitor `llmops up` started (a Ray actor) serves the same families
    status = json.loads(llmops(run, "status", "--json").stdout)["monitor"]
    served = httpx.get(status["metrics"], timeout=10).text.splitlines()
    assert status["running"] and 'llmops_model_versions{model="moderation"} 2.0' in served

    port = free_port()
    env = {**platform.env, "LLMOPS_MONITORING__MONITOR__PORT": str(port),
           "LLMOPS_MONITORING__MONITOR__INTERVAL_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "monitor", "--config",
                             str(platform.config)], env=env, stderr=subprocess.PIPE, text=True)
    def metrics() -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.TransportError:
            return ""  # not listening yet

    try:  # (models are checked one after the other in a round)
        wanted = '{metric="embedding_drift",model="support-router",model_version="1"}'
        wait_for("the monitor's drift metrics", lambda: wanted in metrics(), 90, every_s=1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, logged = proc.communicate(timeout=120)  # after the check in progress
    assert proc.returncode == 0  # a clean stop
    assert any(json.loads(line).get("model") == "support-router" for line in logged.splitlines())
