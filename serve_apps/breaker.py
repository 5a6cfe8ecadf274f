"""A circuit breaker for a pipeline's generator: after `failures` errors or timeouts within
`window_s` it opens, and calls fail at once (the pipeline answers with its fallback, marked
`degraded`) instead of queueing behind a generator that is down or saturated. After
`cooldown_s` it half-opens: one call probes the generator, and its outcome closes the breaker
or opens it for another cool-down. One breaker per ingress replica (each replica learns on its
own traffic, as Envoy's outlier detection does).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from serve_apps.config import BreakerConfig
from training.errors import LLMOpsError

T = TypeVar("T")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class GeneratorUnavailable(LLMOpsError):
    """The generator failed or its breaker is open, and the application has no fallback: 503
    with `Retry-After`."""

    status = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


def callers_fault(error: BaseException) -> bool:
    """Whether an error is the caller's (a 4xx refusal of its input), also when it crossed a
    Ray call (the original is its `cause`)."""
    error = getattr(error, "cause", None) or error
    return isinstance(error, LLMOpsError) and getattr(error, "status", 500) < 500


class CircuitBreaker:
    def __init__(self, config: BreakerConfig, name: str = "generator",
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.name, self.clock = config, name, clock
        self.failures: deque[float] = deque()
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self.opened_at >= self.config.cooldown_s else OPEN

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """`make()`'s result; raises `GeneratorUnavailable` without calling it while open (or while
        another call is probing), and whatever it raised (a timeout as `TimeoutError`). Only
        the model's failures count toward opening, never a caller's refused input."""
        state = self.state
        if state == OPEN or (state == HALF_OPEN and self.probing):
            wait = self.config.cooldown_s - (self.clock() - self.opened_at)
            raise GeneratorUnavailable(f"the {self.name} is unavailable (circuit open after "
                              f"{self.config.failures} failures)", max(wait, 1))
        self.probing = state == HALF_OPEN
        try:
            result = await asyncio.wait_for(make(), self.config.timeout_s)
        except Exception as exc:
            if not callers_fault(exc):  # one caller's bad input says nothing of the model
                self._failed(state)
            raise
        finally:
            self.probing = False
        self.failures.clear()
        self.opened_at = None
        return result

    def _failed(self, state: str) -> None:
        now = self.clock()
        if state == HALF_OPEN:  # the probe failed: another cool-down
            self.opened_at = now
            return
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.config.window_s:
            self.failures.popleft()
        if len(self.failures) >= self.config.failures:
            self.opened_at = now
            self.failures.clear()
