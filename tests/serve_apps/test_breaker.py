"""The generator's circuit breaker: opens after N failures or timeouts in a window, fails fast
while open, lets one probe through after the cool-down, closes on its success."""

import asyncio

import pytest

from serve_apps.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, GeneratorUnavailable
from serve_apps.config import BreakerConfig


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def ok():
    return "answer"


async def boom():
    raise RuntimeError("generator died")


async def slow():
    await asyncio.sleep(1)


def _breaker(**config) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    cfg = BreakerConfig(**{"failures": 3, "window_s": 10, "cooldown_s": 5, "timeout_s": 0.05,
                           **config})
    return CircuitBreaker(cfg, clock=clock), clock


async def _fail(breaker: CircuitBreaker, make=boom) -> None:
    with pytest.raises((RuntimeError, TimeoutError)):
        await breaker.call(make)


def test_opens_after_failures_within_the_window_and_fails_fast():
    async def scenario():
        breaker, clock = _breaker()
        await _fail(breaker)
        clock.now = 11  # the first failure left the window
        await _fail(breaker)
        await _fail(breaker, slow)  # a timeout counts as a failure
        assert breaker.state == CLOSED
        await _fail(breaker)
        assert breaker.state == OPEN
        called = []

        async def spy():
            called.append(1)
            return "x"

        with pytest.raises(GeneratorUnavailable) as refused:
            await breaker.call(spy)
        assert not called and refused.value.status == 503
        assert refused.value.headers["Retry-After"] == "5"

    asyncio.run(scenario())


def test_success_resets_the_count():
    async def scenario():
        breaker, _ = _breaker()
        await _fail(breaker)
        await _fail(breaker)
        assert await breaker.call(ok) == "answer"
        await _fail(breaker)
        await _fail(breaker)
        assert breaker.state == CLOSED

    asyncio.run(scenario())


def test_half_open_lets_one_probe_through_then_closes_or_reopens():
    async def scenario():
        breaker, clock = _breaker(failures=1)
        await _fail(breaker)
        clock.now += 5
        assert breaker.state == HALF_OPEN
        await _fail(breaker)  # the probe failed: another cool-down
        assert breaker.state == OPEN
        clock.now += 5
        gate = asyncio.Event()

        async def probe():
            await gate.wait()
            return "back"

        first = asyncio.ensure_future(breaker.call(probe))
        await asyncio.sleep(0)
        with pytest.raises(GeneratorUnavailable):  # only one probe at a time
            await breaker.call(ok)
        gate.set()
        assert await first == "back" and breaker.state == CLOSED
        assert await breaker.call(ok) == "answer"

    asyncio.run(scenario())


def test_a_callers_bad_input_never_counts_toward_opening():
    from serve_apps.http import InvalidRequest

    async def refused():
        raise InvalidRequest("seed must be a 32-bit unsigned integer")

    async def scenario():
        breaker = CircuitBreaker(BreakerConfig(failures=2, window_s=60, cooldown_s=10))
        for _ in range(5):
            with pytest.raises(InvalidRequest):
                await breaker.call(refused)
        assert breaker.state == CLOSED and await breaker.call(ok) == "answer"

    asyncio.run(scenario())
