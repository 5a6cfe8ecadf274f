"""The HTTP edge every application shares: request ids, input limits, and every error as a JSON
problem (RFC 9457) with the request id, never a 500 with a traceback.

Validation lives in `parse` and `check_texts`, called by the pipelines themselves, so a Python
client going through a `DeploymentHandle` gets the same checks as HTTP (as `InvalidRequest`).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from serve_apps import metrics
from serve_apps.config import LimitsConfig
from training.errors import LLMOpsError

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
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


def new_request_id(given: str | None = None) -> str:
    """`given` when it is a sane id (letters, digits, `.:-_`, at most 128), else a fresh one."""
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(given):
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
        if not text.strip():
            raise InvalidRequest(f"text {i} is empty")
        if len(text) > limits.max_chars:
            raise InvalidRequest(f"text {i} has {len(text)} characters; the limit is "
                                 f"{limits.max_chars}")
    return list(texts)


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


def create_app(title: str, description: str) -> FastAPI:
    """A FastAPI app with the platform's request id and error handling."""
    app = FastAPI(title=title, description=description, version="1")

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        # `POST /v1/moderate` is the application's root: route it without a 307 to `.../`.
        if request.scope["path"] == request.scope.get("root_path"):
            request.scope["path"] += "/"
        # Serve's proxy takes the id from X-Request-ID (or makes one), tags its logs with it and
        # returns it in the response header; the pipelines carry the same id.
        try:
            rid = new_request_id(request.headers.get(REQUEST_ID_HEADER)
                                 or serve.context._get_serve_request_context().request_id or None)
        except InvalidRequest as exc:
            return problem(400, "Bad Request", str(exc), None, "invalid-request")
        request.state.request_id = rid
        return await call_next(request)

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

    return app


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 422: "Unprocessable Content", 429: "Too Many Requests",
           502: "Bad Gateway", 503: "Service Unavailable"}
