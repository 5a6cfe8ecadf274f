"""Serving on real Ray Serve, over HTTP and through handles (the shared stack: serving_stack.py):
the moderation and support pipelines, the benchmark's peers answering as the platform does,
batching under concurrent load, the `openai` client with streaming, bad requests as JSON
problems."""

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from conftest import (
    ROOT,
    free_port,
)
from ray import serve
from serving_stack import (
    MODEL,
    REPLY_TOKENS,
    SUPPORT_TEXTS,
)

from serve_apps.batch import Item
from serve_apps.config import ServeConfig
from serve_apps.http import InvalidRequest
from serve_apps.pii import redact
from training.data import generate
from training.data.support import RESOLUTIONS


def test_moderation_pipeline_over_http_and_handle(platform):
    toxic = list(generate("moderation", "base", 300, seed=7).query("label == 'toxic'").text[:12])
    pii = ["Reach me on +1 415 555 0134 or jane.doe@example.com for the meetup.",
           "My email is mike77@example.org and my phone (212) 555-0199, lost my keys.",
           "hi, mail s.kumar@example.net or ring 555-867-5309 about the bike"]
    r = httpx.post(f"{platform.url}/v1/moderate", json={"texts": [*toxic, *pii]},
                   headers=platform.headers(X_Request_ID="mod-1"), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    # the client's id is its correlation id; the request id is the platform's own
    assert body["correlation_id"] == r.headers["x-request-id"] == "mod-1"
    assert len(body["request_id"]) == 32 and body["request_id"] != "mod-1"
    results = body["results"]
    assert len(results) == len(toxic) + len(pii)
    generator = serve.get_deployment_handle("Generator", "moderation")
    for text, res in zip([*toxic, *pii], results):
        assert res["models"]["classifier"] == MODEL
        assert set(res["scores"]) == {"safe", "toxic", "spam", "pii"}
        assert abs(sum(res["scores"].values()) - 1) < 1e-3
        assert res["verdict"] == max(res["scores"], key=res["scores"].get)
        assert not res["abstained"] and res["candidates"] is None  # abstention off
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
    resp = handle.moderate.remote({"text": pii[-1]}, "mod-2", platform.principal).result()
    assert resp.correlation_id == "mod-2" and resp.results[0].verdict == results[-1]["verdict"]
    with pytest.raises(InvalidRequest, match="empty"):
        handle.moderate.remote({"text": "  "}, None, platform.principal).result()


def test_support_routes_and_suggests_a_generated_or_a_retrieved_reply(platform):
    r = httpx.post(f"{platform.url}/v1/support/route", json={"texts": SUPPORT_TEXTS},
                   headers=platform.auth, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for text, res in zip(SUPPORT_TEXTS, results):
        assert res["label"] in res["scores"] and res["confidence"] == max(res["scores"].values())
        # unsure (its conformal set is not one queue): a person routes it
        assert res["queue"] == ("human-review" if res["abstained"] else res["label"])
        assert res["abstained"] == (len(res["candidates"]) != 1)
        assert res["models"]["router"]["name"] == "support-router"
        assert res["models"]["generator"]["name"] == "support-reply"
        s = res["suggestion"]
        if s["confidence"] >= platform.reply_threshold:
            assert s["source"] == "generator" and "encoder" not in res["models"]
            [expected] = platform.replier.generate([text], REPLY_TOKENS, 0.0, 0, [])
            assert s["reply"] == expected["text"]
            assert s["intent"] is None and s["example"] is None
        else:  # not confident: an agent's reply to the closest resolved ticket
            assert s["source"] == "retrieval" and s["reply"] == RESOLUTIONS[s["intent"]]
            assert -1 <= s["similarity"] <= 1.0001 and s["example"]
            assert res["models"]["encoder"]["version"] == "bundled"
    assert {r["suggestion"]["source"] for r in results} == {"generator", "retrieval"}
    assert {r["abstained"] for r in results} == {True, False}
    # Python callers get the same answers through the application handle.
    again = serve.get_app_handle("support").route.remote({"texts": SUPPORT_TEXTS}, "sup-2",
                                                         platform.principal).result()
    assert again.correlation_id == "sup-2"
    assert [(x.queue, x.suggestion.source, x.suggestion.reply) for x in again.results] == [
        (x["queue"], x["suggestion"]["source"], x["suggestion"]["reply"]) for x in results]


def test_the_benchmark_peers_answer_as_the_platform_does(platform):
    """`bench/serve.py`'s peers, each run once on the suite's models: the pipelines' model calls
    in-process (the limit), the naive FastAPI server, a no-op Serve deployment and the plain
    Serve application; the ones with models give the platform's answers."""
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT / "bench"))
    from peers import load_models, naive_app, noop_app, plain_serve_app, run_pipeline

    cfg = ServeConfig.model_validate(yaml.safe_load(platform.config.read_text())["serve"])
    uri = platform.registry.tracking_uri
    posts = list(generate("moderation", "base", 4, seed=11).text)
    served = {"support": [r["label"] for r in httpx.post(
                  f"{platform.url}/v1/support/route", json={"texts": SUPPORT_TEXTS[:2]},
                  headers=platform.auth, timeout=60).json()["results"]],
              "moderation": [r["verdict"] for r in httpx.post(
                  f"{platform.url}/v1/moderate", json={"texts": posts},
                  headers=platform.auth, timeout=60).json()["results"]]}
    texts = {"support": SUPPORT_TEXTS[:2], "moderation": posts}
    key = {"support": "queue", "moderation": "verdict"}
    direct = {name: run_pipeline(name, load_models(cfg, uri, precision=True), texts[name], cfg)
              for name in texts}
    assert {name: [a[key[name]] for a in answers] for name, answers in direct.items()} == served
    naive = TestClient(naive_app(uri, cfg))
    assert naive.post("/v1/moderate", json={"text": posts[0]}).json() == direct["moderation"][0]
    # (no CPU asked: the suite's replicas hold the session's two)
    serve.run(noop_app(cpus=0), name="peer-noop", route_prefix="/peer-noop")
    serve.run(plain_serve_app(uri, cfg, 4, cpus=0), name="peer-plain", route_prefix="/peer-plain")
    try:
        assert httpx.post(f"{platform.url}/peer-noop", json={"text": "hi"}).json() == {}
        plain = httpx.post(f"{platform.url}/peer-plain/v1/support/route",
                           json={"text": SUPPORT_TEXTS[0]}, timeout=60)
        assert plain.json() == direct["support"][0]
    finally:
        serve.delete("peer-noop")
        serve.delete("peer-plain")


def test_the_bentoml_peer_answers_as_the_platform_does(platform):
    """`bench/serve.py`'s BentoML peer (adaptive batching) gives the models' answers; it runs
    from an environment of its own, which `make bench-env` makes (not part of `make test`)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from peers import BENTOML, bentoml_server, load_models, run_pipeline
    from stack import PIPELINES

    if not BENTOML.exists():
        pytest.skip(f"no {BENTOML} (make bench-env)")
    cfg = ServeConfig.model_validate(yaml.safe_load(platform.config.read_text())["serve"])
    models = load_models(cfg, platform.registry.tracking_uri, precision=True)
    texts = {"support": SUPPORT_TEXTS[:3], "moderation": ["you idiots", "hello all"]}
    with bentoml_server(free_port(), platform.registry.tracking_uri, cfg) as (base, pids):
        assert len(pids) >= 2  # BentoML's server and its service worker

        def ask(path: str, text: str) -> list:
            return httpx.post(base + path, json={"texts": [text]}, timeout=60).json()

        with ThreadPoolExecutor(8) as pool:  # concurrent requests, batched by BentoML
            for name, (_, path, _) in PIPELINES.items():
                answers = list(pool.map(ask, [path] * len(texts[name]), texts[name]))
                assert answers == [[a] for a in run_pipeline(name, models, texts[name], cfg)]


def test_requests_are_batched_under_concurrent_load(platform):
    handle = serve.get_deployment_handle("Classifier", "moderation")
    responses = [handle.predict.remote(Item(f"message number {i}", f"b{i}")) for i in range(48)]
    sizes = [r.result()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 16


def test_openai_client_round_trip_with_streaming(platform):
    from openai import NotFoundError, OpenAI

    key = platform.auth["Authorization"].split()[1]
    client = OpenAI(base_url=f"{platform.url}/v1", api_key=key, max_retries=0)
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
    # the rewriter has no chat template: it cannot be offered tools (a refusal of its replica)
    ("POST", "/v1/chat/completions", {"json": {"model": "rewriter", "messages": [
        {"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "get_time"}}]}}, 422),
    ("GET", "/v1/moderate", {}, 405),
    ("POST", "/v1/moderate/nothing", {"json": {"text": "hi"}}, 404),
])
def test_bad_requests_get_a_json_problem_never_a_500(platform, method, path, kwargs, status):
    kwargs = {**kwargs, "headers": {**platform.auth, **kwargs.get("headers", {})}}
    r = httpx.request(method, f"{platform.url}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"] and "Traceback" not in r.text
