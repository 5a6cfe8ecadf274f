"""The peak switch: while a pipeline replica is under pressure, its classifier's requests go to
the distilled student (`fallback`, `training/distill.py`) until the pressure is gone.

Pressure is read where requests arrive, in the pipeline replica: the requests in flight, and
the 95th percentile latency of the answers of the last `window_s`. The switch turns on when
either crosses its `enter_*` threshold, and off only once both are back under their `exit_*`
thresholds and it has been on `min_on_s` (hysteresis: a load near a threshold does not flap).
Each switch is counted and the state is a gauge (`serve_apps/metrics.py`), which the dashboard
shows as an annotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator

from serve_apps import metrics
from serve_apps.model_config import PeakFallbackConfig


class Pressure:
    """One pipeline replica's switch (`config` None: never on)."""

    def __init__(self, config: PeakFallbackConfig | None,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self.ongoing, self.on, self.since = 0, False, 0.0
        self.answered: deque[tuple[float, float]] = deque()  # (when, latency s)
        self._p95, self._p95_at = 0.0, -1.0
        self._reporter: asyncio.Task | None = None

    def configure(self, config: PeakFallbackConfig | dict | None) -> None:
        """New thresholds (None: no fallback, the switch off), kept from a replica's user_config;
        the switch's state and the latencies measured stay."""
        self.config = None if config is None else PeakFallbackConfig.model_validate(config)
        if self.config is None and self.on:
            self.on = False
            metrics.fallback_switch(False)

    @contextlib.contextmanager
    def track(self) -> Iterator[bool]:
        """Around one request: yields whether the fallback answers it."""
        self._report()
        if self.config is None:  # nothing to switch to: nothing to measure
            yield False
            return
        started = self.clock()
        self.ongoing += 1
        self._update(started)
        try:
            yield self.on
        finally:
            self.ongoing -= 1
            now = self.clock()
            self.answered.append((now, now - started))
            self._update(now)

    def p95_ms(self, now: float) -> float:
        """Of the answers of the last `window_s`; recomputed at most every 100 ms."""
        if now - self._p95_at < 0.1:
            return self._p95
        cutoff = now - self.config.window_s
        while self.answered and self.answered[0][0] < cutoff:
            self.answered.popleft()
        latencies = sorted(s for _, s in self.answered)
        self._p95 = latencies[int(0.95 * (len(latencies) - 1))] * 1000 if latencies else 0.0
        self._p95_at = now
        return self._p95

    def _update(self, now: float) -> None:
        c = self.config
        if c is None:
            return
        p95 = self.p95_ms(now)
        if not self.on and (self.ongoing >= c.enter_ongoing or p95 >= c.enter_p95_ms):
            self.on, self.since = True, now
            metrics.fallback_switch(True)
        elif self.on and now - self.since >= c.min_on_s and self.ongoing <= c.exit_ongoing \
                and p95 <= c.exit_p95_ms:
            self.on = False
            metrics.fallback_switch(False)

    def _report(self) -> None:
        """Keep the state gauge fresh (Ray drops a gauge series not set for a while), and let
        the switch turn off when requests stop coming."""
        if self._reporter is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a unit test): nothing to keep fresh
            return

        async def report() -> None:
            while True:
                self._update(self.clock())
                metrics.fallback_active(self.on)
                await asyncio.sleep(2)

        self._reporter = loop.create_task(report())
