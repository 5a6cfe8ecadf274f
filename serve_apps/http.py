"""The HTTP edge every application shares: request ids, input limits, and every error as a JSON
problem (RFC 9457) with the request id, never a 500 with a traceback.

Validation lives in `parse` and `check_texts`, called by the pipelines themselves, so a Python
client going through a `DeploymentHandle` gets the same checks as HTTP (as `InvalidRequest`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from serve_apps import metrics, network
from serve_apps.config import LimitsConfig
from training.errors import LLMOpsError

network.bind_to_node_ip()  # in a replica: its inter-deployment server on the node's address

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$", re.ASCII)
_SURROGATE = re.compile("[\ud800-\udfff]")
_log = logging.getLogger("ray.serve")
M = TypeVar("M", bound=BaseModel)


class InvalidRequest(LLMOpsError, ValueError):
    """A request the platform refuses to run: empty, too long, wrong types."""

    status = 422


class TextsRequest(BaseModel):
    """One `text`, or up to `limits.max_items` `texts`."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, examples=["You are a useless idiot, fix the app"])
    texts: list[str] | None = None

    def items(self) -> list[str]:
        return ([self.text] if self.text is not None else []) + (self.texts or [])


def served_by(verdicts: list[dict]) -> str | None:
    """`fallback` when the peak fallback answered any of a request's classifications."""
    return "fallback" if any((v.get("model") or {}).get("variant") == "fallback"
                             for v in verdicts) else None


class StageModel(BaseModel):
    """The model that ran one stage: exact version, the alias it was loaded through, and
    whether it answered as champion or challenger."""

    name: str
    version: str
    alias: str | None = None
    variant: str


class GuardrailFinding(BaseModel):
    """A guardrail rule that matched (`serve_apps/guardrails.py`): what it did and to which
    text; never the matched text itself."""

    rule: str
    kind: str
    action: str
    where: str
    item: int
    found: dict[str, int]


class Envelope(BaseModel):
    """What every texts answer carries beside its results (`Call.summary`)."""

    request_id: str = Field(description="made by the platform: feedback names it")
    correlation_id: str | None = Field(None, description="the caller's own id (X-Request-ID)")
    guardrails: list[GuardrailFinding] = Field(default_factory=list)
    degraded: bool = Field(False, description="a fallback answered for a model: the generator "
                           "failed, its breaker is open or it was skipped at a peak, or the peak "
                           "fallback classified")
    served_by: str | None = Field(None, description="`fallback` while the peak fallback (a "
                                  "distilled student) answered: then `degraded` too")


def new_request_id() -> str:
    """The id of a request: made here, unique, never chosen by a client (quota reservations,
    feedback and the canary split are keyed by it)."""
    return uuid.uuid4().hex


def correlation_id(given: str | None) -> str | None:
    """A client's own id for its request (`X-Request-ID`), kept beside the request id and
    returned, once it is sane (letters, digits, `.:-_`, at most 128)."""
    if given is not None and not _REQUEST_ID.fullmatch(given):
        raise InvalidRequest(f"{REQUEST_ID_HEADER} must be 1-128 letters, digits or .:-_")
    return given


def parse(model: type[M], value: M | dict) -> M:
    """A request model from a handle caller's dict (or the model itself)."""
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc.errors())) from None


def request_texts(request: TextsRequest | dict, limits: LimitsConfig) -> list[str]:
    """The texts of a moderation or support request (HTTP body or a handle caller's dict),
    checked against the limits."""
    return check_texts(parse(TextsRequest, request).items(), limits)


def check_texts(texts: Sequence[str], limits: LimitsConfig) -> list[str]:
    if not texts:
        raise InvalidRequest("give 'text' or a non-empty 'texts'")
    if len(texts) > limits.max_items:
        raise InvalidRequest(f"at most {limits.max_items} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        check_text(text, f"text {i}", limits)
    return list(texts)


def check_text(text: str, name: str, limits: LimitsConfig) -> str:
    """One text within the limits (422 otherwise, naming it)."""
    if _SURROGATE.search(text):
        raise InvalidRequest(f"{name} is not valid Unicode (it holds a lone surrogate)")
    if not text.strip():
        raise InvalidRequest(f"{name} is empty")
    if len(text) > limits.max_chars:
        raise InvalidRequest(f"{name} has {len(text)} characters; the limit is "
                             f"{limits.max_chars}")
    return text


class InvalidOutput(LLMOpsError):
    """A model answered outside its contract (a label not in its label set): 502, never shown."""

    status = 502


def check_label(answer: dict) -> dict:
    """A classifier's answer, once its label is one of its labels and its confidence a
    probability."""
    scores, label = answer.get("scores") or {}, answer.get("label")
    confidence = answer.get("confidence")
    if label not in scores or not isinstance(confidence, float) or not 0 <= confidence <= 1:
        model = answer.get("model") or {}
        raise InvalidOutput(f"model {model.get('name')}/{model.get('version')} answered "
                            f"{label!r} ({confidence}) outside its labels {sorted(scores)}")
    return answer


def _first_error(errors: Sequence[dict]) -> str:
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {err['msg']}{more}"


def problem(status: int, title: str, detail: str, request_id: str | None, kind: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """An RFC 9457 problem whose `type` names the error for good (`urn:llmops:problem:<kind>`,
    the error class, or the status title); `error` repeats it in the shape OpenAI clients
    read."""
    kind = kind or title.lower().replace(" ", "-")
    body = {"type": f"urn:llmops:problem:{kind}", "title": title, "status": status,
            "detail": detail, "request_id": request_id,
            "error": {"message": detail, "type": kind.replace("-", "_"), "code": status}}
    metrics.error(status)
    return JSONResponse(body, status_code=status, media_type="application/problem+json",
                        headers=headers)


def _kind(exc: Exception) -> str:
    """`QuotaExceeded` -> `quota-exceeded`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", type(exc).__name__).lower()


def _rid(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


class BodyTooLarge(HTTPException):
    """Raised while the body streams in, past the limit: FastAPI passes it on as it is."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class RefusalLimiter:
    """A token bucket of refusals per client address (bounded: the least recently seen
    addresses are forgotten first). An address that keeps being refused is answered 429 at once,
    before its body is parsed or its token checked."""

    def __init__(self, per_minute: float, burst: int, max_addresses: int = 10_000):
        self.rate, self.burst, self.max_addresses = per_minute / 60, burst, max_addresses
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, address: str, now: float) -> float:
        level, at = self.buckets.get(address, (float(self.burst), now))
        return min(float(self.burst), level + (now - at) * self.rate)

    def wait(self, address: str, now: float | None = None) -> float:
        """0 when `address` may be served; else the seconds until it may."""
        now = time.monotonic() if now is None else now
        level = self._level(address, now)
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def refused(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.buckets[address] = (self._level(address, now) - 1, now)
        self.buckets.move_to_end(address)
        while len(self.buckets) > self.max_addresses:
            self.buckets.popitem(last=False)


class EdgeGuard:
    """What an application's `Edge` enforces: its limits, and who audits the requests its
    policies never saw (refused before the chain started: bad JSON, 413, 429, unknown paths)."""

    def __init__(self, limits: LimitsConfig, audit: Callable[[dict], Awaitable[None]] | None):
        self.limits, self.audit = limits, audit
        self.refusals = RefusalLimiter(limits.refusals_per_minute, limits.refusal_burst)


class Edge:
    """ASGI middleware in front of each application, before any parsing or authentication. It
    gives every request its id (made here) and its correlation id (`X-Request-ID` when sane,
    else Serve's own), and where the application set its `EdgeGuard`: a client address past
    its refusals gets 429, a body past `max_body_bytes` 413 (by its `Content-Length`, or as it
    streams in); every request the policy chain did not audit gets one record of its own
    (without its body: its SHA-256 and size); every 4xx costs the address one refusal.
    `GET /healthz` (probes) is neither audited nor limited. Plain ASGI, not a
    `BaseHTTPMiddleware`: no task per request, and an error raised while the body streams in
    reaches FastAPI as itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # `POST /v1/moderate` is the application's root: route it without a 307 to `.../`.
        if scope["path"] == scope.get("root_path"):
            scope["path"] += "/"
        state = scope.setdefault("state", {})
        headers = dict(scope.get("headers") or [])
        early = None
        state["request_id"] = new_request_id()
        try:
            # Serve's proxy takes X-Request-ID (or makes one), tags its logs with it and returns
            # it in the response header: the correlation id of the request.
            given = headers.get(REQUEST_ID_HEADER.lower().encode())
            state["correlation_id"] = correlation_id(
                given.decode("latin-1") if given is not None else
                serve.context._get_serve_request_context().request_id or None)
        except InvalidRequest as exc:
            early = problem(400, "Bad Request", str(exc), None, "invalid-request")
        guard: EdgeGuard | None = getattr(scope["app"].state, "edge", None) \
            if "app" in scope else None
        if guard is None or scope["path"].endswith("/healthz"):
            return await (early or self.app)(scope, receive, send)
        await self._guarded(guard, early, scope, receive, send, headers)

    async def _guarded(self, guard: EdgeGuard, early, scope, receive, send, headers) -> None:
        state = scope["state"]
        address = (scope.get("client") or ("unknown",))[0]
        limit, digest, size, status = guard.limits.body_bytes, hashlib.sha256(), 0, [0]
        declared = headers.get(b"content-length", b"")
        declared = int(declared) if declared.isdigit() else 0

        async def counted() -> dict:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                digest.update(message.get("body", b""))
                if size > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        wait = guard.refusals.wait(address)
        if wait:
            early = problem(429, "Too Many Requests", f"{address} was refused too often; "
                            f"retry in {math.ceil(wait)} s", None, "too-many-refusals",
                            {"Retry-After": str(max(1, math.ceil(wait)))})
        elif early is None and declared > limit:
            early = problem(413, "Content Too Large", str(BodyTooLarge(limit).detail), None)
        try:
            await (early or self.app)(scope, counted if early is None else receive, watched)
        finally:
            if 400 <= status[0] < 500:
                guard.refusals.refused(address)
            if guard.audit is not None and not state.get("audited"):
                await asyncio.shield(guard.audit({
                    "request_id": state["request_id"],
                    "correlation_id": state.get("correlation_id"),
                    "client": address, "method": scope.get("method"), "path": scope["path"],
                    "status": status[0] or 500, "body_sha256": digest.hexdigest(),
                    "body_bytes": max(size, declared)}))


def create_app(title: str, description: str) -> FastAPI:
    """A FastAPI app with the platform's request id, edge limits, error handling and
    `GET /healthz`."""
    app = FastAPI(title=title, description=description, version="1")

    app.add_middleware(Edge)  # before the body and the token

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return problem(400, "Bad Request", "the body is not valid JSON", _rid(request),
                           "invalid-json")
        return problem(422, "Unprocessable Content", _first_error(errors), _rid(request),
                       "invalid-request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return problem(exc.status_code, _TITLES.get(exc.status_code, "Error"), str(exc.detail),
                       _rid(request))

    @app.exception_handler(LLMOpsError)
    async def refused(request: Request, exc: LLMOpsError):
        cause = getattr(exc, "cause", None)  # the error itself when it crossed a Ray call
        exc = cause if isinstance(cause, LLMOpsError) else exc
        status = getattr(exc, "status", 400)
        message = str(exc).strip().splitlines()[-1]
        return problem(status, _TITLES.get(status, "Bad Request"), message, _rid(request),
                       _kind(exc), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        _log.exception("request %s failed", _rid(request))
        return problem(500, "Internal Server Error",
                       "the request failed inside the platform; quote the request id",
                       _rid(request))

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, without authentication (for load balancers)."""
        return {"status": "ok"}

    return app


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 413: "Content Too Large", 422: "Unprocessable Content",
           429: "Too Many Requests",
           502: "Bad Gateway", 503: "Service Unavailable"}
