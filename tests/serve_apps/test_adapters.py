"""Many LoRA adapters over one base in serving (`serve_apps/adapters.py`): one generator
deployment serves a tiny Llama base and two adapters registered on it, picked by the OpenAI
`model` field through Serve's model multiplexing; an adapter swaps under load without a failed
request or a replica restart, and serves a canary; an adapter of another base is refused.

This module's Serve runs over HTTPS (`serve.tls` with `llmops tls dev-cert`'s CA and
certificate, `serve_apps/tls.py`): its HTTP requests are real TLS handshakes, and a plain-HTTP
request or a client that does not trust the CA is refused.

The adapters here are PEFT adapters with random weights, registered as a LoRA fine-tune
registers its adapter (`register_model_dir`): serving is what is tested; the LoRA fine-tunes
themselves are in test_training.py."""

from __future__ import annotations

import functools
import json
import socket
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port, lora_adapter, running, tiny_llama_folder, tiny_settings, wait_for

from cluster.runtime import PLATFORM_ENV
from serve_apps.config import ServeConfig
from serve_apps.deploy import ServeCluster, serve_config, set_canary, swap
from serve_apps.model_config import CanaryConfig
from serve_apps.tls import client_context, dev_cert
from training.errors import BaseMismatch, LLMOpsError
from training.refs import reference
from training.registry import Registry

TEXTS = ["you are all idiots here", "what a stupid take", "nobody asked you, clown"]
MAX_TOKENS = 8


@dataclass
class Served:
    registry: Registry
    cluster: ServeCluster
    url: str
    versions: dict  # task -> [registered version numbers, in order]
    tls: ssl.SSLContext  # what a client trusting the dev CA verifies with


def _register(settings, registry, task: str, folder: Path) -> int:
    from training.job import register_model_dir
    from training.taskdata import build_task_data

    return register_model_dir(settings.training, registry, task,
                              build_task_data(settings.training, task), folder, [],
                              history=[], ds_config={}, started=time.perf_counter()).version


def _adapter(settings, registry, task: str, base: str, seed: int, folder: Path) -> int:
    """A LoRA adapter of the registered `base` (large random weights: it changes answers)."""
    from training.registry import download_hf_model

    lora_adapter(download_hf_model(base), base, folder, seed, lora_alpha=256,
                 init_lora_weights=False)
    return _register(settings, registry, task, folder)


def _config(port: int, max_adapters: int, tls: dict) -> ServeConfig:
    off = {"enabled": False}
    return ServeConfig.model_validate({
        "port": port, "use_gpu": "no", "tls": tls, "moderation": off, "support": off, "feedback": off,
        "advisor": off,
        "chat": {"generator": {
            "model": "models:/rewriter@champion", "placement": "replica",
            "adapters": {"toxic-a": "models:/rewriter-a@champion",
                         "toxic-b": "models:/rewriter-b@champion"},
            "max_adapters": max_adapters,
            "resources": {"num_cpus": 0.25},
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}})


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ray import serve

    root = tmp_path_factory.mktemp("adapters")
    settings = tiny_settings(root / "state")
    lora = {"dataset": "moderation", "kind": "causal-lm", "label_priors": {"toxic": 1.0},
            "method": "lora", "model": {"source": "models:/rewriter@champion", "max_length": 64},
            "train_size": 48, "holdout_size": 16, "golden_size": 16, "holdouts": ["base"]}
    settings.training.tasks = {**settings.training.tasks, "rewriter-a": lora, "rewriter-b": lora}
    registry = Registry(settings.registry, settings.data_dir)
    import mlflow

    mlflow.set_tracking_uri(registry.tracking_uri)
    base = _register(settings, registry, "rewriter", tiny_llama_folder(root / "base", settings))
    other = _register(settings, registry, "rewriter",  # another base: version 2
                      tiny_llama_folder(root / "other-base", settings))
    b1, b2 = reference("rewriter", base), reference("rewriter", other)
    versions = {"rewriter": [base, other],
                "rewriter-a": [_adapter(settings, registry, "rewriter-a", b1, 1, root / "a1"),
                               _adapter(settings, registry, "rewriter-a", b1, 2, root / "a2"),
                               _adapter(settings, registry, "rewriter-a", b2, 3, root / "a3")],
                "rewriter-b": [_adapter(settings, registry, "rewriter-b", b1, 4, root / "b1")]}
    cluster, port = ServeCluster(ray_session.dashboard), free_port()
    serve.shutdown()  # Serve keeps the port it started on: start it on this module's own
    # one adapter per replica: every switch evicts the other
    config = _config(port, max_adapters=1, tls=dev_cert(root / "tls", ["llmops.test"]))
    cluster.deploy(serve_config(config, registry.tracking_uri, False, dict(PLATFORM_ENV)),
                   timeout_s=240)
    assert config.url == f"https://127.0.0.1:{port}"
    yield Served(registry, cluster, config.url, versions, client_context(config.tls))
    cluster.shutdown()
    serve.shutdown()  # and the next module on its own


def _chat(model: str, text: str, rid: str | None = None) -> dict:
    from ray import serve

    body = {"model": model, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": text}]}
    return serve.get_app_handle("chat").complete.remote(body, rid).result(timeout_s=60)


def _expected(served: Served, uri: str, texts: list[str]) -> list[str]:
    """What the version alone answers, merged into its base and loaded outside Serve."""
    from serve_apps.model import load

    loaded = load(uri, served.registry.tracking_uri)
    return [r["text"] for r in loaded.generate(texts, MAX_TOKENS, 0.0, 0, ["\n"])]


def test_the_front_door_speaks_only_verified_https(served):
    """The proxy presents a certificate the dev CA signed for loopback and the name asked for;
    a client that does not trust the CA, and plain HTTP to the same port, get no answer."""
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            served.tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
        names = {value for _, value in conn.getpeercert()["subjectAltName"]}
    assert {"127.0.0.1", "localhost", "llmops.test"} <= names
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{served.url}/v1/models", timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert httpx.get(f"{served.url}/v1/models", timeout=10, verify=served.tls).status_code == 200


def test_models_lists_the_base_and_each_adapter_over_http(served):
    with urllib.request.urlopen(f"{served.url}/v1/models", timeout=30,
                                context=served.tls) as resp:
        listed = {m["id"]: m for m in json.load(resp)["data"]}
    assert set(listed) == {"rewriter", "toxic-a", "toxic-b"}
    assert listed["rewriter"]["parent"] is None and listed["rewriter"]["root"] == "models:/rewriter/1"
    a = served.versions["rewriter-a"][0]
    assert listed["toxic-a"]["parent"] == "rewriter"
    assert listed["toxic-a"]["root"] == reference("rewriter-a", a)


def test_concurrent_requests_for_two_adapters_and_the_base_get_their_own_answers(served):
    """Requests for both adapters and the base at once, on one replica holding one adapter at a
    time: each answer is what its version gives alone, and names that version and its base."""
    a, b = served.versions["rewriter-a"][0], served.versions["rewriter-b"][0]
    want = {"toxic-a": _expected(served, reference("rewriter-a", a), TEXTS),
            "toxic-b": _expected(served, reference("rewriter-b", b), TEXTS),
            "rewriter": _expected(served, "models:/rewriter/1", TEXTS)}
    assert len({tuple(v) for v in want.values()}) == 3  # the adapters change the answers
    jobs = [(model, i) for _ in range(3) for model in want for i in range(len(TEXTS))]
    got: dict = {}

    def ask(job):
        model, i = job
        got[job + (len(got),)] = _chat(model, TEXTS[i])

    threads = [threading.Thread(target=ask, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(got) == len(jobs)
    for (model, i, _), out in got.items():
        assert out["choices"][0]["message"]["content"] == want[model][i], (model, i)
        meta = out["llmops"]["model"]
        if model == "rewriter":
            assert (meta["name"], meta["version"]) == ("rewriter", "1") and "base" not in meta
        else:
            assert meta["base"] == "models:/rewriter/1"
            assert (meta["name"], meta["version"]) == (
                {"toxic-a": ("rewriter-a", str(a)), "toxic-b": ("rewriter-b", str(b))}[model])


def test_requests_for_different_adapters_share_a_batch(served):
    """Four requests for each adapter at once: more than four were in the continuous batch
    together, so it held both (one split by adapter holds at most four). Answers long enough
    that eight requests sent together overlap on a busy machine; that a step computes each
    token by its own adapter is test_generation_engine.py's."""
    from ray import serve

    generator = serve.get_deployment_handle("Generator", "chat")
    for adapter in ("toxic-a", "toxic-b"):  # both loaded: no request waits for its adapter
        generator.generate.remote(TEXTS[0], "warm", model=adapter, max_new_tokens=1).result(
            timeout_s=60)
    calls = [generator.generate.remote(TEXTS[0], f"mix-{i}", model=("toxic-a", "toxic-b")[i % 2],
                                       max_new_tokens=48) for i in range(8)]
    outs = [c.result(timeout_s=60) for c in calls]
    assert {o["model"]["name"] for o in outs} == {"rewriter-a", "rewriter-b"}
    assert max(o["batch_size"] for o in outs) > 4, [o["batch_size"] for o in outs]


def test_a_stream_by_an_adapter_equals_its_completion(served):
    from ray import serve

    body = {"model": "toxic-b", "max_tokens": MAX_TOKENS, "stream": True,
            "messages": [{"role": "user", "content": TEXTS[0]}]}
    chunks = list(serve.get_app_handle("chat").options(stream=True).stream.remote(body))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[0]["llmops"]["model"]["name"] == "rewriter-b"
    assert text == _chat("toxic-b", TEXTS[0])["choices"][0]["message"]["content"]


def test_an_unknown_model_is_a_404_naming_what_is_served(served):
    req = urllib.request.Request(
        f"{served.url}/v1/chat/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "toxic-c", "messages": [{"role": "user", "content": "hi"}]})
        .encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30, context=served.tls)
    assert err.value.code == 404
    assert "toxic-a" in json.load(err.value)["detail"]


def test_an_adapter_of_another_base_is_refused_and_nothing_changes(served):
    """Swapping in an adapter version trained on another base, or the base under its
    adapters, is refused before anything is deployed."""
    a1, _, a3 = served.versions["rewriter-a"]
    before = served.cluster.deployed_config()
    with pytest.raises(BaseMismatch, match="trained on models:/rewriter/2.*serves models:/rewriter/1"):
        swap(served.cluster, "rewriter-a", served.registry.tracking_uri, version=a3)
    with pytest.raises(BaseMismatch, match="trained on models:/rewriter/1.*serves models:/rewriter/2"):
        swap(served.cluster, "rewriter", served.registry.tracking_uri, version=2)
    # nor does an adapter's canary: a challenger of another base, or one asked to shadow
    with pytest.raises(BaseMismatch, match="trained on models:/rewriter/2"):
        set_canary(served.cluster, "rewriter-a", served.registry.tracking_uri,
                   CanaryConfig(model=reference("rewriter-a", a3)))
    with pytest.raises(LLMOpsError, match="splits requests.*cannot shadow"):
        set_canary(served.cluster, "rewriter-a", served.registry.tracking_uri,
                   CanaryConfig(model=reference("rewriter-a", a1), shadow=True))
    assert served.cluster.deployed_config() == before


def test_an_adapter_swaps_under_load_without_a_failed_request_or_restart(served):
    """Requests for the adapter keep coming while its alias moves to a new version and
    `swap` pins it: none fails, the same replica answers, and the new version answers after."""
    a1, a2, _ = served.versions["rewriter-a"]
    replicas = lambda: sorted(r["replica_id"] for r in served.cluster.details()  # noqa: E731
                              ["applications"]["chat"]["deployments"]["Generator"]["replicas"])
    before = replicas()
    stop, answers, errors = threading.Event(), [], []

    def load(k: int):
        while not stop.is_set():
            try:
                answers.append((time.monotonic(), _chat("toxic-a", TEXTS[k % len(TEXTS)])
                                ["llmops"]["model"]["version"]))
            except Exception as exc:  # counted: the test fails on any
                errors.append(repr(exc))

    with running(stop, *[functools.partial(load, k) for k in range(4)]):
        wait_for("answers before the swap", lambda: len(answers) >= 8 or errors, 60)
        served.registry.set_alias("rewriter-a", "champion", a2)
        swapped = swap(served.cluster, "rewriter-a", served.registry.tracking_uri,
                       alias="champion")
        done = time.monotonic()
        wait_for("answers after the swap", lambda: sum(
            t > done + 0.5 for t, _ in answers) >= 8 or errors, 60)
    assert not errors, errors[:3]
    assert swapped["serving"] == reference("rewriter-a", a2)
    assert {v for _, v in answers} == {str(a1), str(a2)}
    assert all(v == str(a2) for at, v in answers if at > done + 0.5)
    assert replicas() == before  # reconfigured in place, no new replica
    assert _chat("toxic-a", TEXTS[0])["choices"][0]["message"]["content"] == \
        _expected(served, reference("rewriter-a", a2), TEXTS[:1])[0]


def test_an_adapters_canary_answers_its_share_of_requests_until_a_swap_ends_it(served):
    """A canary of the adapter's other version: the request ids its fraction picks get the
    challenger's answer, marked `challenger`, the rest the serving version's; swapping to the
    challenger ends the canary."""
    a1, a2, _ = served.versions["rewriter-a"]
    serving = served.cluster.status()["chat"]["deployments"]["Generator"]["adapters"]["toxic-a"]
    champion, challenger = (a2, a1) if serving["model"] == reference("rewriter-a", a2) \
        else (a1, a2)
    set_canary(served.cluster, "rewriter-a", served.registry.tracking_uri,
               CanaryConfig(model=reference("rewriter-a", challenger), fraction=0.5))
    status = served.cluster.status()["chat"]["deployments"]["Generator"]
    assert status["adapter_canaries"]["toxic-a"]["model"] == reference("rewriter-a", challenger)
    expected = {str(v): _expected(served, reference("rewriter-a", v), TEXTS[:1])[0]
                for v in (champion, challenger)}
    sides = {}
    for k in range(16):  # both sides: all 16 on one is a chance of 3 in 100,000
        out = _chat("toxic-a", TEXTS[0], f"canary-{k}")
        model = out["llmops"]["model"]
        sides.setdefault(model["variant"], set()).add(model["version"])
        assert out["choices"][0]["message"]["content"] == expected[model["version"]]
    assert sides == {"champion": {str(champion)}, "challenger": {str(challenger)}}
    # the other adapter has no canary
    assert _chat("toxic-b", TEXTS[0], "canary-0")["llmops"]["model"]["variant"] == "champion"
    swap(served.cluster, "rewriter-a", served.registry.tracking_uri, version=challenger)
    assert "adapter_canaries" not in served.cluster.status()["chat"]["deployments"]["Generator"]
    answers = [_chat("toxic-a", TEXTS[0], f"canary-{k}")["llmops"]["model"] for k in range(6)]
    assert {(m["variant"], m["version"]) for m in answers} == {("champion", str(challenger))}

