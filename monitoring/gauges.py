"""Gauges that hold their value. Ray drops a gauge series that is not set again within about two
export intervals, so a state set once (a file moved aside, the free disk, the loop's state)
would vanish from Prometheus while it still holds. `hold` sets a series now and again every few
seconds, from one daemon thread per process, for as long as the process lives; setting it
again replaces the held value."""

from __future__ import annotations

import functools
import threading
import time

EVERY_S = 5.0
_held: dict[tuple, tuple] = {}  # (id of the metric, tags) -> (metric, tags, value)
_lock = threading.Lock()


def hold(metric, value: float, tags: dict[str, str] | None = None) -> None:
    """Set `metric` (a Ray or Serve gauge) to `value` for `tags`, and keep it set."""
    tags = dict(tags or {})
    metric.set(value, tags=tags)
    with _lock:
        _held[(id(metric), tuple(sorted(tags.items())))] = (metric, tags, value)
    _keeper()


@functools.cache
def _keeper() -> threading.Thread:
    def run() -> None:
        while True:
            time.sleep(EVERY_S)
            with _lock:
                held = list(_held.values())
            for metric, tags, value in held:
                try:
                    metric.set(value, tags=tags)
                except Exception:  # a metric must never take its process down
                    pass

    thread = threading.Thread(target=run, name="llmops-held-gauges", daemon=True)
    thread.start()
    return thread


@functools.cache
def gauge(name: str, description: str, tags: tuple[str, ...] = ()):
    """A Ray gauge (exported as `ray_<name>` on the node's metrics port), one per process."""
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tags)
