"""The HTTP edge every application shares (`serve_apps.http.Edge`), on a real FastAPI app in
process: the body-size limit before parsing, refusals limited per client address before any
token is checked, and one audit record (without the body) for every request the policy chain
never saw."""

import hashlib

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve_apps.auth import Unauthorized
from serve_apps.config import LimitsConfig
from serve_apps.http import EdgeGuard, RefusalLimiter, create_app


class Body(BaseModel):
    text: str


@pytest.fixture
def edge():
    """An app with one route that refuses without a token and audits itself like the chain."""
    app = create_app("edge test", "")
    audited: list[dict] = []

    @app.post("/echo")
    async def echo(body: Body, request: Request) -> dict:
        request.state.audited = True  # what the policy chain's audit does
        if request.headers.get("authorization") != "Bearer good":
            raise Unauthorized("a bearer token is required")
        return {"text": body.text}

    async def audit(record: dict) -> None:
        audited.append(record)

    limits = LimitsConfig(max_chars=100, max_items=2, max_messages=2, refusal_burst=5,
                          refusals_per_minute=60)
    app.state.edge = EdgeGuard(limits, audit)
    return TestClient(app), audited, limits


def test_a_body_over_the_limit_is_413_before_parsing_and_audited_without_it(edge):
    client, audited, limits = edge
    assert limits.body_bytes == 6 * 100 * 2 + 16 * 1024
    big = b'{"text": "' + b"x" * limits.body_bytes + b'"}'
    r = client.post("/echo", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["type"] == "urn:llmops:problem:content-too-large"
    # without a Content-Length (chunked), the body is cut off as it streams in
    r = client.post("/echo", content=iter([big[:10_000], big[10_000:]]),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["type"] == "urn:llmops:problem:content-too-large"
    assert [a["status"] for a in audited] == [413, 413]
    assert audited[0]["body_bytes"] == len(big) and audited[0]["client"] == "testclient"
    assert all(set(a) == {"request_id", "correlation_id", "client", "method", "path", "status",
                          "body_sha256", "body_bytes"} and "x" * 100 not in str(a)
               for a in audited)


def test_refusals_before_the_chain_are_audited_once_and_answered_requests_not_twice(edge):
    client, audited, _ = edge
    assert client.post("/echo", content=b"{bad", headers={"content-type": "application/json"}
                       ).status_code == 400
    assert client.post("/echo", json={"txt": "hi"}).status_code == 422
    assert client.get("/nothing").status_code == 404
    assert client.post("/echo", json={"text": "hi"},
                       headers={"authorization": "Bearer good"}).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert [(a["status"], a["method"], a["path"]) for a in audited] == [
        (400, "POST", "/echo"), (422, "POST", "/echo"), (404, "GET", "/nothing")]
    assert audited[0]["body_sha256"] == hashlib.sha256(b"{bad").hexdigest()
    assert all(a["request_id"] for a in audited)


def test_an_address_refused_too_often_gets_429_before_its_token_is_checked(edge):
    client, audited, _ = edge
    codes = [client.post("/echo", json={"text": "hi"}).status_code for _ in range(8)]
    assert codes == [401] * 5 + [429] * 3
    r = client.post("/echo", json={"text": "hi"}, headers={"authorization": "Bearer good"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["type"] == "urn:llmops:problem:too-many-refusals"
    assert [a["status"] for a in audited] == [429] * 4  # the 401s were audited by the route


def test_the_refusal_limiter_refills_and_forgets_the_oldest_addresses():
    limiter = RefusalLimiter(per_minute=60, burst=2, max_addresses=3)
    for _ in range(2):
        limiter.refused("a", now=0)
    assert limiter.wait("a", now=0) == pytest.approx(1.0) and limiter.wait("b", now=0) == 0
    assert limiter.wait("a", now=1.0) == 0  # one refusal's worth back after a second
    for address in "bcd":
        limiter.refused(address, now=2)
    assert list(limiter.buckets) == ["b", "c", "d"]  # bounded memory: "a" forgotten
