"""The governance policies every application runs, as one chain: each policy is one small unit
with three hooks, `before` (in the declared order, before the models run), `after` (in reverse
order, on the answer before it leaves) and `failed` (for the policies whose `before` ran, when
anything later failed). An application declares its order in `policies` (default `audit, auth,
quota, guardrails`): audit first, so refused requests are audited too; its `after` last, so the
record holds the answer exactly as it leaves.

HTTP and `DeploymentHandle` calls go through the same chain. Trust model: an HTTP caller proves
who it is with a bearer token (`Caller.http`); a handle caller is code inside the Ray cluster,
which can already do anything the cluster can, so it states its `Principal` (or passes a token
to be verified) and that principal's scopes, quota and audit apply as for HTTP. A handle call
with neither is refused (401) wherever `auth` is a policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from monitoring.batching import GroupCommit
from serve_apps import metrics
from serve_apps.auth import Principal, Unauthorized, Verifier
from serve_apps.call import Answer, Call, Caller, audit_record, estimate_tokens, outcome_of
from serve_apps.config import LimitsConfig
from serve_apps.guardrails import Finding, Guardrails
from serve_apps.http import EdgeGuard, InvalidRequest, correlation_id, new_request_id
from serve_apps.policy_config import AuthConfig, GuardrailsConfig, QuotaConfig
from serve_apps.quota import QuotaExceeded
from training.errors import LLMOpsError

T = TypeVar("T")
_log = logging.getLogger("ray.serve")


class AuditUnavailable(LLMOpsError):
    """The audit record could not be written, so the answer is not given: 503."""

    status = 503
    headers = {"Retry-After": "5"}


class Policy:
    """The hooks; a policy overrides those it needs."""

    async def before(self, call: Call) -> None:
        return None

    async def after(self, call: Call, answer: Answer) -> None:
        return None

    async def failed(self, call: Call, error: Exception) -> None:
        return None


class Authenticate(Policy):
    """A verified principal holding the route's scope: 401 / 403 otherwise."""

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    async def before(self, call: Call) -> None:
        stated = call.caller.principal
        if isinstance(stated, dict):
            try:
                stated = Principal(str(stated["subject"]), str(stated["tenant"]),
                                   frozenset(stated["scopes"]))
            except (KeyError, TypeError):
                raise Unauthorized("a stated principal needs a subject, a tenant and a list "
                                   "of scopes") from None
        principal = stated or self.verifier.verify(call.caller.authorization)
        principal.require(call.scope)
        call.principal = principal


class Quota(Policy):
    """Reserve one request and the estimated tokens with the tenant's quota authority, commit
    the tokens used, refund a failed request.

    The reservations of concurrent requests share one call to the authority. Settlements are
    not waited for: they ride with the replica's next reservations, ahead of them, or leave on
    their own after `SETTLE_AFTER_S`, so a request costs about one Ray call, not two (each is
    about 2 ms of CPU on either side). Until its settlement lands, a request stays charged its
    reservation, so a budget is never exceeded; a settlement lost with its replica or a failed
    call leaves that charge in place until midnight."""

    SETTLE_AFTER_S = 0.1

    def __init__(self, authority):
        self.calls = GroupCommit(lambda ops: authority.apply_many.remote(ops))
        self.settlements: list[tuple] = []
        self.sending: set[asyncio.Task] = set()

    async def before(self, call: Call) -> None:
        ops, self.settlements = self.settlements, []
        *_, decision = await self.calls.submit(
            [*ops, ("reserve", call.principal.tenant, call.request_id, call.tokens)])
        call.headers.update(decision["headers"])
        if "refused" in decision:
            raise QuotaExceeded(decision["refused"], decision["headers"])

    async def after(self, call: Call, answer: Answer) -> None:
        self._settle(call, answer.tokens)

    async def failed(self, call: Call, error: Exception) -> None:
        self._settle(call, None)

    def _settle(self, call: Call, tokens: int | None) -> None:
        if not self.settlements:
            asyncio.get_running_loop().call_later(self.SETTLE_AFTER_S, self._send)
        self.settlements.append(("settle", call.principal.tenant, call.request_id, tokens))

    def _send(self) -> None:
        """The settlements no reservation took along (a task kept until it is done)."""
        ops, self.settlements = self.settlements, []
        if ops:
            task = asyncio.ensure_future(self.calls.submit(ops))
            self.sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self.sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.warning("quota settlements not recorded (their reservations stay charged): %s",
                        task.exception())


class Guard(Policy):
    """The application's guardrails: input rules before the models, output rules after."""

    def __init__(self, config: GuardrailsConfig):
        self.input, self.output = Guardrails(config.input, "input"), Guardrails(config.output,
                                                                                "output")

    def _found(self, call: Call, findings: list[Finding]) -> None:
        call.findings += findings
        for f in findings:
            metrics.guardrail_finding(f.rule, f.action)

    async def before(self, call: Call) -> None:
        call.texts, findings = self.input.check(call.texts)
        self._found(call, findings)

    async def after(self, call: Call, answer: Answer) -> None:
        answer.outputs, findings = self.output.check(answer.outputs)
        self._found(call, findings)


class Audit(Policy):
    """One hash-chained record per request, on disk before the answer leaves."""

    def __init__(self, logger):
        # concurrent requests of a replica share one call to the logger (and one fsync)
        self.commit = GroupCommit(lambda records: logger.append.remote(records))

    async def write(self, record: dict) -> None:
        try:
            await self.commit.submit([record])
        except Exception as exc:
            raise AuditUnavailable("the audit log cannot be written; the request was not "
                                   "answered") from exc

    async def after(self, call: Call, answer: Answer) -> None:
        await self.write(audit_record(call, answer, "ok", 200))
        call.mark_audited()

    async def failed(self, call: Call, error: BaseException) -> None:
        status, outcome = outcome_of(error)
        await self.write(audit_record(call, None, outcome, status, str(error)[:300]))
        call.mark_audited()


class PolicyChain:
    """An application's policies in their declared order."""

    def __init__(self, application: str, policies: list[Policy]):
        self.application, self.policies = application, policies

    @property
    def checks_output(self) -> bool:
        """Whether an answer's text may still change after the model (output guardrails)."""
        return any(isinstance(p, Guard) and p.output.rules for p in self.policies)

    def edge(self, limits: LimitsConfig) -> EdgeGuard:
        """The HTTP edge of this application (`serve_apps.http.Edge`): its limits, and its
        audit of the requests refused before this chain saw them."""
        return EdgeGuard(limits, self._unaudited if self._audit is not None else None)

    @property
    def _audit(self) -> Audit | None:
        return next((p for p in self.policies if isinstance(p, Audit)), None)

    async def _unaudited(self, seen: dict) -> None:
        """The record of a request refused before the chain opened: what arrived (its hash and
        size, never its body), from where, and the refusal."""
        await self._audit.write({
            "ts": datetime.now(UTC).isoformat(), "request_id": seen["request_id"],
            "correlation_id": seen["correlation_id"], "tenant": None, "principal": None,
            "transport": seen.get("transport", "http"), "client": seen["client"],
            "application": self.application, "method": seen["method"], "path": seen["path"],
            "input_sha256": [seen["body_sha256"]], "body_bytes": seen["body_bytes"],
            "input": None, "output": None,
            "outcome": "refused" if 400 <= seen["status"] < 500 else "error",
            "status": seen["status"]})

    async def admit(self, method: str, request: Any, caller: Caller,
                    handle: Callable[[], Awaitable[T]]) -> T:
        """`handle()`, the whole of a handle call's `method` on `request`: one that fails before
        the chain opened (a request that does not parse or breaks a limit, an unknown model)
        gets its record here, as the HTTP edge gives one to its clients' requests."""
        try:
            return await handle()
        except BaseException as exc:
            if self._audit is not None and not getattr(caller.state, "audited", False):
                body = json.dumps(request if isinstance(request, dict) else
                                  getattr(request, "model_dump", lambda: repr(request))(),
                                  default=str, sort_keys=True).encode()
                status, _ = outcome_of(exc)
                try:
                    given = correlation_id(caller.correlation_id)
                except InvalidRequest:
                    given = None
                await asyncio.shield(self._unaudited({
                    "request_id": new_request_id(), "transport": "handle",
                    "correlation_id": given,
                    "client": None, "method": method, "path": None,
                    "status": status, "body_sha256": hashlib.sha256(body).hexdigest(),
                    "body_bytes": len(body)}))
            raise

    def open(self, scope: str, texts: list[str], caller: Caller, tokens: int = 0) -> Call:
        from monitoring.audit import input_hash

        rid = getattr(caller.state, "request_id", None) or new_request_id()  # HTTP: the edge's
        return Call(self.application, scope, rid, list(texts), caller,
                    correlation_id(caller.correlation_id), tokens,
                    raw_hashes=[input_hash(t) for t in texts])

    async def enter(self, call: Call) -> None:
        """The `before` hooks; on a refusal, `failed` of those that ran, then the refusal."""
        for policy in self.policies:
            try:
                await policy.before(call)
            except BaseException as exc:
                # its own `failed` too: a quota reservation cut off by a cancel is refunded
                call.entered.append(policy)
                await self.fail(call, exc)
                raise
            call.entered.append(policy)

    async def leave(self, call: Call, answer: Answer) -> Answer:
        """The `after` hooks, in reverse order."""
        try:
            for policy in reversed(call.entered):
                await policy.after(call, answer)
        except BaseException as exc:
            await self.fail(call, exc)
            raise
        call.log(200, "degraded" if answer.degraded else "ok")
        return answer

    async def fail(self, call: Call, error: BaseException) -> None:
        """`failed` of every policy that let the call in, once. Shielded: a cancelled request
        (its client gone) is still audited and its quota settled."""
        call.log(*outcome_of(error))
        entered, call.entered = call.entered, []
        if entered:
            await asyncio.shield(self._failed(entered, call, error))

    @staticmethod
    async def _failed(entered: list[Policy], call: Call, error: BaseException) -> None:
        for policy in reversed(entered):
            await policy.failed(call, error)

    async def authorize(self, caller: Caller, scope: str) -> Principal:
        """Only the authentication (for reads that are no inference, like listing models)."""
        call = self.open(scope, [], caller)
        for policy in self.policies:
            if isinstance(policy, Authenticate):
                await policy.before(call)
        return call.principal

    async def run(self, call: Call, work: Callable[[Call], Awaitable[Answer]]) -> Answer:
        await self.enter(call)
        try:
            answer = await work(call)
        except BaseException as exc:
            await self.fail(call, exc)
            raise
        return await self.leave(call, answer)


    async def apply(self, scope: str, texts: list[str], caller: Caller,
                    work: Callable[[Call], Awaitable[Answer]], generated_per_text: int = 0,
                    response=None) -> tuple[Call, Answer]:
        """`work` on `texts` under the chain, charged the estimated tokens; the answer's
        headers (`RateLimit-*`) set on the HTTP `response`, if any."""
        call = self.open(scope, texts, caller, estimate_tokens(texts, generated_per_text))
        answer = await self.run(call, work)
        if response is not None:
            response.headers.update(call.headers)
        return call, answer


def chain(application: str, order: list[str], guardrails: GuardrailsConfig,
          governance: dict | None) -> PolicyChain:
    """The chain of `order` for one application. `governance` (from the platform settings):
    `auth` (AuthConfig with its secret file), `quota` (QuotaConfig with its store), `audit`
    (`{"folder": ..., **AuditConfig}`, or None when off); None: no policies at all."""
    if governance is None:
        return PolicyChain(application, [])
    policies: list[Policy] = []
    for name in order:
        if name == "audit" and governance.get("audit"):
            from monitoring.audit import logger
            from monitoring.config import AuditConfig

            audit = dict(governance["audit"])
            folder = audit.pop("folder")
            policies.append(Audit(logger(AuditConfig(**audit), folder)))
        elif name == "auth":
            policies.append(Authenticate(Verifier(AuthConfig(**governance["auth"]), Path("."))))
        elif name == "quota":
            from serve_apps.quota import authority

            quota = QuotaConfig(**governance["quota"])
            policies.append(Quota(authority(quota, Path(quota.store))))
        elif name == "guardrails":
            policies.append(Guard(guardrails))
    return PolicyChain(application, policies)


