"""Serving on real Ray Serve, deployed by `llmops up` on the shared Ray instance: pipelines over
HTTP and handles, batching, hot swap under load, canary routing, the `openai` client, bad
requests, GPU placement and autoscaling. Models are tiny ones trained in-process and registered
in a real MLflow registry."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import register_quick, tiny_settings
from ray import serve

from cluster.runtime import PLATFORM_ENV
from serve_apps.config import CanaryConfig, ServeConfig
from serve_apps.deploy import ServeCluster, serve_config, set_canary, swap
from serve_apps.deployments import Item, bucket
from serve_apps.http import InvalidRequest
from serve_apps.pii import redact
from training.data import generate
from training.data.support import RESOLUTIONS
from training.registry import Registry

MODEL = {"name": "moderation", "version": "1", "alias": "champion", "variant": "champion"}
ONE_REPLICA = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}


@dataclass
class Platform:
    url: str
    config: Path
    env: dict
    registry: Registry
    cluster: ServeCluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llmops(platform_or_env, *args) -> subprocess.CompletedProcess:
    env, config = platform_or_env
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env=env)


def _settings(state: Path, port: int):
    settings = tiny_settings(state)
    tasks = dict(settings.training.tasks)
    moderation = tasks["moderation"]
    tasks["moderation"] = moderation.model_copy(update={  # ~0.93 macro-F1 in 5 s
        "train_size": 800, "label_priors": {"safe": 0.3, "toxic": 0.3, "spam": 0.2, "pii": 0.2},
        "model": moderation.model.model_copy(update={"architecture": {
            "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 128}})})
    settings.training.tasks = tasks
    classifier = {"model": "models:/moderation@champion", **ONE_REPLICA,
                  "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}}
    settings.serve = ServeConfig.model_validate({
        "port": port, "use_gpu": "no",
        "moderation": {"classifier": classifier, "generator": {
            "model": "models:/rewriter@champion", **ONE_REPLICA}},
        "support": {"classifier": {"model": "models:/support-router@champion", **ONE_REPLICA},
                    "encoder": {"model": "all-MiniLM-L6-v2", **ONE_REPLICA}},
        "chat": {"generator": {"model": "models:/rewriter@champion", **ONE_REPLICA}}})
    return settings


@pytest.fixture(scope="module")
def platform(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    port = _free_port()
    settings = _settings(root / "state", port)
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, "moderation", epochs=10, lr=1e-3)
    register_quick(settings, registry, "moderation", epochs=10, lr=1e-3, seed=1)
    register_quick(settings, registry, "rewriter")
    register_quick(settings, registry, "support-router")
    config = root / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "LLMOPS_RAY__ADDRESS": ray_session.address,
           "LLMOPS_RAY__DASHBOARD_PORT": ray_session.dashboard.rsplit(":", 1)[1]}
    proc = _llmops((env, config), "up", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    up = json.loads(proc.stdout)
    assert up["started_ray"] is False  # it joined the running cluster
    assert yaml.safe_load(Path(up["serve_config"]).read_text())["applications"]
    yield Platform(f"http://127.0.0.1:{port}", config, env, registry,
                   ServeCluster(ray_session.dashboard))
    down = _llmops((env, config), "down")
    assert down.returncode == 0, down.stderr[-2000:]
    assert not ServeCluster(ray_session.dashboard).details()["applications"]


def test_moderation_pipeline_over_http_and_handle(platform):
    toxic = list(generate("moderation", "base", 300, seed=7).query("label == 'toxic'").text[:12])
    pii = ["Reach me on +1 415 555 0134 or jane.doe@example.com for the meetup.",
           "My email is mike77@example.org and my phone (212) 555-0199, lost my keys.",
           "hi, mail s.kumar@example.net or ring 555-867-5309 about the bike"]
    r = httpx.post(f"{platform.url}/v1/moderate", json={"texts": [*toxic, *pii]},
                   headers={"X-Request-ID": "mod-1"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == r.headers["x-request-id"] == "mod-1"
    results = body["results"]
    assert len(results) == len(toxic) + len(pii)
    generator = serve.get_deployment_handle("Generator", "moderation")
    for text, res in zip([*toxic, *pii], results):
        assert res["models"]["classifier"] == MODEL
        assert set(res["scores"]) == {"safe", "toxic", "spam", "pii"}
        assert abs(sum(res["scores"].values()) - 1) < 1e-3
        assert res["verdict"] == max(res["scores"], key=res["scores"].get)
        if res["verdict"] == "toxic":
            assert res["action"] == "rewrite" and res["models"]["generator"]["name"] == "rewriter"
            expected = generator.generate.remote(text, "check").result()["text"]
            assert res["safe_text"] == redact(expected).text
        elif res["verdict"] == "spam":
            assert res["action"] == "block" and res["safe_text"] is None
        else:
            assert res["action"] in ("allow", "redact") and "generator" not in res["models"]
    assert any(r["action"] == "rewrite" for r in results)  # the tiny model flags toxic posts
    shown = [r for r in results[-len(pii):] if r["action"] in ("allow", "redact")]
    assert shown and all(r["redactions"] == {"PHONE": 1, "EMAIL": 1} for r in shown)
    assert all("[PHONE]" in r["safe_text"] and "@" not in r["safe_text"] for r in shown)

    handle = serve.get_app_handle("moderation")
    resp = handle.moderate.remote({"text": pii[-1]}, "mod-2").result()
    assert resp.request_id == "mod-2" and resp.results[0].verdict == results[-1]["verdict"]
    with pytest.raises(InvalidRequest, match="empty"):
        handle.moderate.remote({"text": "  "}).result()


def test_support_routes_and_suggests_a_resolved_reply(platform):
    texts = list(generate("support-tickets", "base", 4, seed=3).text)
    r = httpx.post(f"{platform.url}/v1/support/route", json={"texts": texts}, timeout=120)
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert res["queue"] in res["scores"] and res["confidence"] == max(res["scores"].values())
        s = res["suggestion"]
        assert s["reply"] == RESOLUTIONS[s["intent"]] and -1 <= s["similarity"] <= 1.0001
        assert res["models"]["router"]["name"] == "support-router"
        assert res["models"]["encoder"]["version"] == "bundled"
    # A resolved ticket asked again is its own nearest neighbour.
    example = r.json()["results"][0]["suggestion"]
    again = serve.get_app_handle("support").route.remote({"text": example["example"]}).result()
    assert again.results[0].suggestion.intent == example["intent"]
    assert again.results[0].suggestion.similarity > 0.99


def test_requests_are_batched_under_concurrent_load(platform):
    handle = serve.get_deployment_handle("Classifier", "moderation")
    responses = [handle.predict.remote(Item(f"message number {i}", f"b{i}")) for i in range(48)]
    sizes = [r.result()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 16


def test_openai_client_round_trip_with_streaming(platform):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{platform.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["rewriter"]
    messages = [{"role": "system", "content": "be kind"},
                {"role": "user", "content": "You people are useless idiots"}]
    done = client.chat.completions.create(model="rewriter", messages=messages, max_tokens=12)
    text = done.choices[0].message.content
    assert done.id.startswith("chatcmpl-") and done.model == "rewriter"
    assert isinstance(text, str) and done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="rewriter", messages=messages,
                                                 max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    with pytest.raises(NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=messages)


@pytest.mark.parametrize("method,path,kwargs,status", [
    ("POST", "/v1/moderate", {"json": {"text": ""}}, 422),
    ("POST", "/v1/moderate", {"json": {"text": "x" * 2001}}, 422),
    ("POST", "/v1/moderate", {"json": {"text": 5}}, 422),
    ("POST", "/v1/moderate", {"json": {"texts": ["hi"] * 33}}, 422),
    ("POST", "/v1/moderate", {"json": {"txt": "hi"}}, 422),
    ("POST", "/v1/moderate", {"content": b"{bad", "headers": {"content-type": "application/json"}},
     400),
    ("POST", "/v1/support/route", {"json": {"text": "hi"}, "headers": {"X-Request-ID": "a b!"}},
     400),
    ("POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}}, 404),
    ("POST", "/v1/chat/completions", {"json": {"model": "rewriter", "messages": []}}, 422),
    ("POST", "/v1/chat/completions", {"json": {"model": "rewriter", "messages": [
        {"role": "robot", "content": "hi"}]}}, 422),
    ("GET", "/v1/moderate", {}, 405),
    ("POST", "/v1/moderate/nothing", {"json": {"text": "hi"}}, 404),
])
def test_bad_requests_get_a_json_problem_never_a_500(platform, method, path, kwargs, status):
    r = httpx.request(method, f"{platform.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"] and "Traceback" not in r.text


def _load(url: str, stop: threading.Event, log: list, workers: int = 6) -> list[threading.Thread]:
    def run() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{url}/v1/moderate", json={"text": "you are all idiots"})
                    version = (r.json()["results"][0]["models"]["classifier"]["version"]
                               if r.status_code == 200 else None)
                    log.append((started, r.status_code, version))
                except httpx.HTTPError as exc:
                    log.append((started, type(exc).__name__, None))

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


def test_hot_swap_under_load_fails_no_request(platform):
    log: list = []
    stop = threading.Event()
    threads = _load(platform.url, stop, log)
    while len(log) < 150:
        time.sleep(0.05)
    result = swap(platform.cluster, "moderation", platform.registry.tracking_uri, version=2)
    swapped_at = time.monotonic()
    while len(log) < 500 or sum(1 for t, *_ in log if t > swapped_at) < 100:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert result["deployments"] == ["moderation/Classifier"]
    assert [s for _, s, _ in log if s != 200] == []
    assert {v for *_, v in log} == {"1", "2"}
    assert {v for t, _, v in log if t > swapped_at} == {"2"}  # every replica switched
    swap(platform.cluster, "moderation", platform.registry.tracking_uri, alias="champion")
    status = platform.cluster.status()["moderation"]["deployments"]["Classifier"]
    assert (status["model"], status["alias"]) == ("models:/moderation/1", "champion")


def test_canary_split_is_sticky_and_shadow_answers_with_champion(platform):
    uri = platform.registry.tracking_uri
    set_canary(platform.cluster, "moderation", uri,
               CanaryConfig(model="models:/moderation@challenger", fraction=0.3))
    handle = serve.get_deployment_handle("Classifier", "moderation")
    ids = [f"req-{i}" for i in range(1000)]
    answers = [handle.predict.remote(Item("is this spam?", rid)) for rid in ids]
    variants = [a.result()["model"] for a in answers]
    for rid, model in zip(ids, variants):
        expected = "challenger" if bucket(rid) < 0.3 else "champion"
        assert model["variant"] == expected
        assert model["version"] == ("2" if expected == "challenger" else "1")
    share = sum(m["variant"] == "challenger" for m in variants) / len(ids)
    assert 0.25 < share < 0.35
    again = [handle.predict.remote(Item("other text", rid)).result()["model"]["variant"]
             for rid in ids[:50]]
    assert again == [m["variant"] for m in variants[:50]]  # sticky per request id

    set_canary(platform.cluster, "moderation", uri,
               CanaryConfig(model="models:/moderation/2", fraction=1.0, shadow=True))
    resp = serve.get_app_handle("moderation").moderate.remote({"text": "hello"}, "s-1").result()
    models = resp.results[0].models
    assert models["classifier"].model_dump() == MODEL
    assert (models["classifier_shadow"].version, models["classifier_shadow"].variant) == (
        "2", "shadow")
    set_canary(platform.cluster, "moderation", uri, None)
    assert platform.cluster.status()["moderation"]["deployments"]["Classifier"]["canary"] is None


def test_cli_status_swap_and_errors(platform):
    run = (platform.env, platform.config)
    proc = _llmops(run, "status", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    apps = json.loads(proc.stdout)["applications"]
    assert {a: apps[a]["status"] for a in apps} == {"moderation": "RUNNING", "support": "RUNNING",
                                                    "chat": "RUNNING"}
    assert apps["chat"]["deployments"]["Generator"]["model"] == "models:/rewriter/1"
    for args, message in [(("swap", "moderation", "--version", "99"), "not in the registry"),
                          (("swap", "nosuch", "--alias", "champion"), "not in the registry"),
                          (("canary", "moderation", "--version", "2", "--fraction", "1.5"),
                           "--fraction")]:
        proc = _llmops(run, *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_gpu_replicas_are_placed_and_autoscale(ray_session, platform):
    """Runs last: replaces the applications with one whose classifier asks for half a GPU."""
    import ray

    config = ServeConfig.model_validate({
        "port": int(platform.url.rsplit(":", 1)[1]), "use_gpu": "yes",
        "support": {"enabled": False}, "chat": {"enabled": False},
        "moderation": {
            "classifier": {"model": "models:/moderation@champion",
                           "resources": {"num_cpus": 0.1, "num_gpus": 0.5},
                           "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
                           "autoscaling": {"min_replicas": 1, "max_replicas": 3,
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

    def hammer() -> None:
        while not stop.is_set():
            [r.result() for r in [handle.predict.remote(Item(f"t{i}", f"g{i}")) for i in range(32)]]

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while replicas().get("RUNNING", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    scaled = replicas().get("RUNNING", 0)
    gpus_at_peak = gpus_in_use()
    stop.set()
    for t in threads:
        t.join()
    assert scaled >= 2 and gpus_at_peak >= 1.0  # each classifier replica holds half a GPU
    deadline = time.monotonic() + 120
    while replicas() != {"RUNNING": 1} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replicas() == {"RUNNING": 1}  # back down when idle
    generator = lambda: cluster.status()["moderation"]["deployments"]["Generator"]["replicas"]  # noqa: E731
    while generator() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert generator() == {}  # min_replicas 0: the idle generator scaled to zero
    assert gpus_in_use() == pytest.approx(0.5)  # one classifier replica's half GPU
