"""Per-tenant quotas with one authority: a daily request budget, a daily token budget (prompt
plus generated) and a request rate, all reset at UTC midnight.

A request reserves before it runs (one request, its estimated tokens) and commits its actual
tokens when answered, or is refunded when it fails. Every reservation goes through one
`Ledger`, held by one Ray actor (`QuotaAuthority`) that all replicas call, so two replicas can
never both take the last unit of a budget: the check and the charge are one step in one
process. The ledger is saved after every change (atomically replaced and fsynced before the
answer), so a restarted authority goes on from the same counts; reservations open at a crash stay
charged (a budget is never exceeded, at worst under-used until midnight). A ledger found corrupt
is moved aside (alert `LLMOpsStateFileCorrupt`) and the day's counts start again from zero.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from monitoring.files import quarantine, report_quarantined, write_atomic
from monitoring.singleton import keyed, singleton
from serve_apps.policy_config import QuotaConfig, TenantLimits
from training.errors import LLMOpsError


class QuotaExceeded(LLMOpsError):
    """429 with `Retry-After` and the `RateLimit-*` headers."""

    status = 429

    def __init__(self, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.headers = headers


@dataclass
class Usage:
    """A tenant's charges on one UTC day."""

    day: str
    requests: int = 0
    tokens: int = 0
    reserved: dict[str, list[int]] = field(default_factory=dict)  # request id -> [requests, tokens]


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def _seconds_to_midnight(now: float) -> int:
    moment = datetime.fromtimestamp(now, UTC)
    midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - moment).total_seconds()))


class Ledger:
    """The counts and the rules; `QuotaAuthority` makes it the one copy a cluster has."""

    def __init__(self, config: QuotaConfig, path: Path | None = None):
        self.config, self.path = config, path
        self.usage: dict[str, Usage] = {}
        self.buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        if path is not None and path.exists():
            try:
                self.usage = {t: Usage(**u) for t, u in json.loads(path.read_text()).items()}
            except (ValueError, TypeError, AttributeError) as exc:  # never a crash loop
                quarantine(path, f"unreadable quota ledger: {exc}")
        if path is not None:
            report_quarantined(path.name, 0)

    def _today(self, tenant: str, now: float) -> Usage:
        usage = self.usage.get(tenant)
        if usage is None or usage.day != _day(now):  # a new UTC day starts from zero
            usage = self.usage[tenant] = Usage(_day(now))
        return usage

    def _headers(self, limits: TenantLimits, usage: Usage, now: float) -> dict[str, str]:
        headers = {"RateLimit-Reset": str(_seconds_to_midnight(now))}
        if limits.requests_per_day is not None:
            headers["RateLimit-Limit"] = str(limits.requests_per_day)
            headers["RateLimit-Remaining"] = str(max(0, limits.requests_per_day - usage.requests))
        return headers

    def _refuse(self, why: str, retry_after: int, headers: dict[str, str]) -> QuotaExceeded:
        return QuotaExceeded(f"{why}; retry in {retry_after} s",
                             {**headers, "Retry-After": str(retry_after)})

    def _take_rate(self, tenant: str, rate: float, now: float) -> float:
        """Take one request from the tenant's bucket (one second's worth, refilled at `rate`);
        0 when taken, else the seconds until one is available."""
        tokens, at = self.buckets.get(tenant, (max(1.0, rate), now))
        tokens = min(max(1.0, rate), tokens + (now - at) * rate)
        if tokens < 1:
            self.buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate
        self.buckets[tenant] = (tokens - 1, now)
        return 0.0

    def reserve(self, tenant: str, request_id: str, tokens: int,
                now: float | None = None) -> dict[str, str]:
        """Charge one request and `tokens` (an estimate) to the tenant, or refuse; returns the
        `RateLimit-*` headers of the answer."""
        now = time.time() if now is None else now
        limits = self.config.limits_for(tenant)
        usage = self._today(tenant, now)
        headers = self._headers(limits, usage, now)
        reset = _seconds_to_midnight(now)
        if limits.requests_per_day is not None and usage.requests + 1 > limits.requests_per_day:
            raise self._refuse(f"tenant {tenant!r} used its {limits.requests_per_day} requests "
                               f"of the day", reset, headers)
        if limits.tokens_per_day is not None and usage.tokens + tokens > limits.tokens_per_day:
            raise self._refuse(f"tenant {tenant!r} would pass its {limits.tokens_per_day} tokens "
                               f"of the day ({usage.tokens} used, {tokens} asked)", reset, headers)
        if limits.requests_per_second is not None:
            wait = self._take_rate(tenant, limits.requests_per_second, now)
            if wait:
                raise self._refuse(f"tenant {tenant!r} sends more than "
                                   f"{limits.requests_per_second:g} requests per second",
                                   max(1, math.ceil(wait)), headers)
        usage.requests += 1
        usage.tokens += tokens
        usage.reserved[request_id] = [1, tokens]
        self._save()
        return self._headers(limits, usage, now)

    def commit(self, tenant: str, request_id: str, tokens: int, now: float | None = None) -> None:
        """The request was answered: its charge becomes the `tokens` it really used."""
        usage = self._today(tenant, time.time() if now is None else now)
        _, estimate = usage.reserved.pop(request_id, [1, 0])
        usage.tokens += tokens - estimate
        self._save()

    def refund(self, tenant: str, request_id: str, now: float | None = None) -> None:
        """The request failed: nothing of it stays charged."""
        usage = self._today(tenant, time.time() if now is None else now)
        requests, tokens = usage.reserved.pop(request_id, [0, 0])
        usage.requests -= requests
        usage.tokens -= tokens
        self._save()

    @contextlib.contextmanager
    def deferred(self):
        """Changes inside are saved once, at the end (a batch of calls, one write)."""
        self.path, path = None, self.path
        try:
            yield
        finally:
            self.path = path
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        write_atomic(self.path, json.dumps({t: u.__dict__ for t, u in self.usage.items()}))


class QuotaAuthority:
    """The cluster's one ledger, as a Ray actor (`authority()` starts or finds it). Its methods
    run one at a time, which is what makes a reservation atomic across replicas."""

    def __init__(self, config_json: str, path: str):
        self.ledger = Ledger(QuotaConfig.model_validate_json(config_json), Path(path))

    def configure(self, config_json: str) -> None:
        self.ledger.config = QuotaConfig.model_validate_json(config_json)

    def reserve(self, tenant: str, request_id: str, tokens: int) -> dict:
        """`{"headers": ...}`, or `{"refused": message, "headers": ...}` (an exception would
        reach the caller wrapped; the caller raises `QuotaExceeded` itself)."""
        try:
            return {"headers": self.ledger.reserve(tenant, request_id, tokens)}
        except QuotaExceeded as exc:
            return {"refused": str(exc), "headers": exc.headers}

    def apply_many(self, ops: list[tuple[str, str, str, int | None]]) -> list[dict | None]:
        """Each (`reserve`, tenant, request id, tokens) reserved (its `reserve` answer), each
        (`settle`, tenant, request id, tokens used) committed, or refunded where tokens is None
        (None); in order, with one save for the batch."""
        with self.ledger.deferred():
            return [self.reserve(*args) if kind == "reserve" else self._settle(*args)
                    for kind, *args in ops]

    def _settle(self, tenant: str, request_id: str, tokens: int | None) -> None:
        if tokens is None:
            self.ledger.refund(tenant, request_id)
        else:
            self.ledger.commit(tenant, request_id, tokens)

    def commit(self, tenant: str, request_id: str, tokens: int) -> None:
        self.ledger.commit(tenant, request_id, tokens)

    def refund(self, tenant: str, request_id: str) -> None:
        self.ledger.refund(tenant, request_id)


def authority(config: QuotaConfig, path: Path):
    """The quota authority of the ledger at `path` on the connected Ray cluster, started on
    first use (it outlives the replicas; restarted by Ray from the saved ledger). A running
    authority takes `config` as its limits from now on."""
    path = Path(path).resolve()
    actor = singleton(QuotaAuthority, keyed("llmops-quota", str(path)), config.model_dump_json(),
                      str(path))
    actor.configure.remote(config.model_dump_json())
    return actor
