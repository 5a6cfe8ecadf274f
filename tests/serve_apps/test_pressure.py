"""The peak switch without Ray: on when requests in flight or the p95 latency cross their
`enter_*` thresholds, off only once both are under their `exit_*` and it was on `min_on_s`;
never on without a fallback configured."""

import pytest
from pydantic import ValidationError

from serve_apps.model_config import PeakFallbackConfig
from serve_apps.pressure import Pressure

CONFIG = PeakFallbackConfig(model="models:/m@fallback", enter_ongoing=3, exit_ongoing=1,
                            enter_p95_ms=500, exit_p95_ms=200, window_s=5, min_on_s=2)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_in_flight_turn_it_on_and_it_stays_on_until_calm_and_min_on_s():
    clock = Clock()
    p = Pressure(CONFIG, clock)
    held = [p.track() for _ in range(4)]
    seen = [h.__enter__() for h in held]
    assert seen == [False, False, True, True]  # the third request in flight crosses 3
    for h in held[:3]:
        h.__exit__(None, None, None)
    assert p.on  # one in flight (<= exit 1), but not on for min_on_s yet
    clock.now += 2.5
    held[3].__exit__(None, None, None)
    assert not p.on
    with p.track() as peak:
        assert not peak


def test_a_slow_window_turns_it_on_and_a_fast_one_off():
    clock = Clock()
    p = Pressure(CONFIG, clock)
    for _ in range(5):
        with p.track():
            clock.now += 0.6  # 600 ms answers: the p95 crosses 500 ms
    with p.track() as peak:
        assert peak
    clock.now += 6  # those answers left the window
    for _ in range(20):
        with p.track():
            clock.now += 0.05
    assert not p.on and p.p95_ms(clock.now) < 200


def test_between_the_thresholds_it_keeps_its_state():
    clock = Clock()
    p = Pressure(CONFIG, clock)
    for _ in range(5):
        with p.track():
            clock.now += 0.3  # 300 ms: under enter (500), over exit (200)
    assert not p.on
    p.on, p.since = True, clock.now - 10
    with p.track():
        clock.now += 0.3
    assert p.on  # still over the exit threshold


def test_without_a_fallback_it_is_never_on():
    p = Pressure(None)
    held = [p.track() for _ in range(100)]
    assert not any(h.__enter__() for h in held)
    for h in held:
        h.__exit__(None, None, None)
    assert not p.answered  # keeps no window it would never read


@pytest.mark.parametrize("change", [{"exit_ongoing": 3}, {"exit_p95_ms": 600}])
def test_exit_thresholds_must_be_below_enter(change):
    with pytest.raises(ValidationError, match="exit_\\* threshold must be below"):
        PeakFallbackConfig(**{**CONFIG.model_dump(), **change})


def test_new_thresholds_apply_in_place_and_none_turns_it_off():
    """What a replica's `reconfigure` does with its user_config's `pressure`."""
    p = Pressure(None)
    p.configure(CONFIG.model_dump(mode="json"))  # as the user_config holds it
    held = [p.track() for _ in range(3)]
    assert [h.__enter__() for h in held] == [False, False, True]
    p.configure({**CONFIG.model_dump(mode="json"), "enter_ongoing": 10, "exit_ongoing": 5})
    assert p.on and p.config.enter_ongoing == 10  # the state stays until the load says
    p.configure(None)
    assert not p.on and p.config is None
    for h in held:
        h.__exit__(None, None, None)
    with p.track() as peak:
        assert not peak
    with pytest.raises(ValidationError):
        p.configure({**CONFIG.model_dump(mode="json"), "exit_ongoing": 99})
