"""One request as the governance policies see it (`serve_apps/policies.py`): who sent it
(`Caller`), the call with what the policies learn of it (`Call`), what the pipeline answered
(`Answer`), and the records made of it: the audit record and the log line per request."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from serve_apps.auth import Principal
from serve_apps.guardrails import Finding
from serve_apps.inference_log import DEFAULT_TENANT
from serve_apps.pii import redact
from training.errors import LLMOpsError

_log = logging.getLogger("ray.serve")
ANONYMOUS = Principal(subject="anonymous", tenant=DEFAULT_TENANT, scopes=frozenset())


@dataclass(frozen=True)
class Caller:
    """Who sends a request: an HTTP client with its `Authorization` header, or in-cluster code
    with a handle, stating its principal."""

    correlation_id: str | None = None
    principal: Principal | dict | None = None
    authorization: str | None = None
    transport: str = "handle"
    address: str | None = None
    # the HTTP request's (`request_id`, ...), a handle call's own: `audited` once it has a record
    state: Any = field(default_factory=lambda: SimpleNamespace(request_id=None, audited=False),
                       compare=False)

    @classmethod
    def http(cls, request) -> Caller:
        return cls(request.state.correlation_id, None, request.headers.get("authorization"),
                   "http", request.client.host if request.client else None, request.state)


@dataclass
class Call:
    """One request as the policies see it. `texts` are what the models read (input guardrails
    may redact them); `tokens` is the estimate the quota reserves."""

    application: str
    scope: str
    request_id: str
    texts: list[str]
    caller: Caller
    correlation_id: str | None = None
    tokens: int = 0
    principal: Principal = ANONYMOUS
    started: float = field(default_factory=time.perf_counter)
    raw_hashes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    entered: list = field(default_factory=list)
    logged: bool = False

    def summary(self, degraded: bool, served_by: str | None = None) -> dict:
        """What every answer reports of its call: request id, guardrail findings, degraded,
        and `served_by: fallback` when the peak fallback answered."""
        return {"request_id": self.request_id, "correlation_id": self.correlation_id,
                "guardrails": [f.to_dict() for f in self.findings], "degraded": degraded,
                "served_by": served_by}

    def log(self, status: int, outcome: str) -> None:
        """One log line per request, with the platform's own fields beside Serve's context (whose
        `request_id` is Serve's: the caller's X-Request-ID when sent): with JSON logs, a shipper
        joins it to the audit record and the answer by `llmops_request_id`."""
        if self.logged:
            return
        self.logged = True
        _log.info("%s %s %s %d", self.application, self.scope, outcome, status, extra={
            "llmops_request_id": self.request_id, "correlation_id": self.correlation_id,
            "tenant": self.principal.tenant, "subject": self.principal.subject, "scope": self.scope,
            "outcome": outcome, "status": status, "texts": len(self.texts),
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 1)})

    def mark_audited(self) -> None:
        """Tell the HTTP edge (or `PolicyChain.admit`) this request has its record: they audit
        those that have none."""
        self.caller.state.audited = True


@dataclass
class Answer:
    """What a pipeline produced: per item the text that leaves (None: no text) and the models
    of every stage; the tokens actually used; `payload` is the pipeline's own result."""

    outputs: list[str | None]
    models: list[dict]
    tokens: int = 0
    degraded: bool = False
    payload: Any = None
    tools: list[dict] = field(default_factory=list)  # tool calls: name, arguments, result
    served_by: str | None = None  # `fallback`: the peak fallback answered (serve_apps/pressure.py)


@dataclass
class Decided:
    """One text's decision in a `TextsPipeline`: the pipeline's result (with its `models`), the
    classifier's raw answer (logged for the drift checks; its `tokens` charged), the text that
    leaves, the generator's tokens, and whether a fallback answered."""

    result: Any
    decision: dict
    output: str | None
    tokens: int = 0
    degraded: bool = False


def outcome_of(error: BaseException) -> tuple[int, str]:
    """(status, outcome) of a failed request: a 4xx refusal, a client gone (499, as nginx
    logs it), or an error."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return 499, "cancelled"
    status = getattr(error, "status", 500)
    return status, "refused" if isinstance(error, LLMOpsError) and status < 500 else "error"


def audit_record(call: Call, answer: Answer | None, outcome: str, status: int,
                 error: str | None = None) -> dict:
    """Who asked what and what was answered: inputs as a hash of the raw text and PII-redacted,
    outputs as they left (redacted again for the log). A refused request keeps no input text
    (its hashes and sizes only): refusals cost the log little, whoever sends them."""
    return {
        "ts": datetime.now(UTC).isoformat(), "request_id": call.request_id,
        "correlation_id": call.correlation_id,
        "tenant": call.principal.tenant, "principal": call.principal.subject,
        "transport": call.caller.transport, "client": call.caller.address,
        "application": call.application, "scope": call.scope,
        "input_sha256": call.raw_hashes, "input_chars": [len(t) for t in call.texts],
        "input": None if outcome == "refused" else [redact(t).text for t in call.texts],
        "output": [None if o is None else redact(o).text for o in answer.outputs]
        if answer else None,
        "models": [{stage: _model_ref(m) for stage, m in models.items()}
                   for models in answer.models] if answer else None,
        "guardrails": [f.to_dict() for f in call.findings],
        **({"tools": answer.tools} if answer and answer.tools else {}),
        "degraded": answer.degraded if answer else False,
        "tokens": answer.tokens if answer else 0,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 2),
        "outcome": outcome, "status": status, "error": error}


def _model_ref(model) -> str | None:
    if model is None:
        return None
    m = model if isinstance(model, dict) else model.model_dump()
    return f"{m.get('name')}/{m.get('version')}:{m.get('variant')}" if m else None


def estimate_tokens(texts: list[str], generated_per_text: int = 0) -> int:
    """What a request may cost before it runs: about four characters per prompt token, plus
    the generator's limit per text (the commit charges the real count)."""
    return sum(len(t) // 4 + 1 + generated_per_text for t in texts)
