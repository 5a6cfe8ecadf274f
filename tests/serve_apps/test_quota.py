"""Per-tenant quotas: each budget enforced with 429 headers, commit and refund, the UTC-midnight
reset, the rate limit, durability across restarts, and the one authority under concurrent
reservations from two replicas never letting a single request past the budget."""

from datetime import UTC, datetime

import pytest

from serve_apps.policy_config import QuotaConfig, TenantLimits
from serve_apps.quota import Ledger, QuotaExceeded

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC).timestamp()


def _ledger(tmp_path=None, **limits) -> Ledger:
    config = QuotaConfig(default=TenantLimits(**{"requests_per_day": None, "tokens_per_day": None,
                                                 "requests_per_second": None} | limits))
    return Ledger(config, tmp_path / "quota.json" if tmp_path else None)


def test_the_daily_request_budget_refuses_the_next_request_with_headers():
    ledger = _ledger(requests_per_day=3)
    headers = [ledger.reserve("acme", f"r{i}", 10, now=NOON + i) for i in range(3)]
    assert [h["RateLimit-Remaining"] for h in headers] == ["2", "1", "0"]
    with pytest.raises(QuotaExceeded, match="used its 3 requests of the day") as refused:
        ledger.reserve("acme", "r3", 10, now=NOON + 3)
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == str(12 * 3600 - 3)  # until UTC midnight
    assert refused.value.headers["RateLimit-Limit"] == "3"
    ledger.reserve("other", "o1", 10, now=NOON)  # another tenant has its own budget


def test_tokens_are_reserved_then_committed_at_their_real_count_or_refunded():
    ledger = _ledger(tokens_per_day=100)
    ledger.reserve("acme", "a", 60, now=NOON)
    with pytest.raises(QuotaExceeded, match="60 used, 50 asked"):
        ledger.reserve("acme", "b", 50, now=NOON)
    ledger.commit("acme", "a", 30, now=NOON)  # it used fewer than it reserved
    ledger.reserve("acme", "b", 50, now=NOON)
    ledger.refund("acme", "b", now=NOON)  # failed: nothing of it stays charged
    assert (ledger.usage["acme"].tokens, ledger.usage["acme"].requests) == (30, 1)
    assert ledger.usage["acme"].reserved == {}


def test_budgets_reset_at_utc_midnight():
    ledger = _ledger(requests_per_day=1)
    before = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC).timestamp()
    ledger.reserve("acme", "late", 1, now=before)
    with pytest.raises(QuotaExceeded) as refused:
        ledger.reserve("acme", "later", 1, now=before + 0.5)
    assert refused.value.headers["Retry-After"] == "1"
    ledger.reserve("acme", "next-day", 1, now=before + 2)


def test_the_rate_limit_allows_a_second_of_burst_then_the_refill_rate():
    ledger = _ledger(requests_per_second=2)
    ledger.reserve("acme", "1", 0, now=NOON)
    ledger.reserve("acme", "2", 0, now=NOON)
    with pytest.raises(QuotaExceeded, match="more than 2 requests per second") as refused:
        ledger.reserve("acme", "3", 0, now=NOON + 0.1)
    assert refused.value.headers["Retry-After"] == "1"
    ledger.reserve("acme", "4", 0, now=NOON + 0.6)  # half a second refills one request


def test_per_tenant_limits_replace_the_default():
    config = QuotaConfig(default=TenantLimits(requests_per_day=5),
                         tenants={"trial": TenantLimits(requests_per_day=1)})
    ledger = Ledger(config)
    ledger.reserve("trial", "t1", 0, now=NOON)
    with pytest.raises(QuotaExceeded, match="its 1 requests"):
        ledger.reserve("trial", "t2", 0, now=NOON + 1)
    for i in range(5):
        ledger.reserve("acme", f"a{i}", 0, now=NOON + i)


def test_the_ledger_survives_a_restart(tmp_path):
    ledger = _ledger(tmp_path, requests_per_day=3)
    ledger.reserve("acme", "a", 5, now=NOON)
    ledger.reserve("acme", "open", 5, now=NOON)  # still open when the process dies
    again = _ledger(tmp_path, requests_per_day=3)
    again.reserve("acme", "c", 5, now=NOON)
    with pytest.raises(QuotaExceeded):
        again.reserve("acme", "d", 5, now=NOON)
    again.refund("acme", "open", now=NOON)  # its refund still finds it
    again.reserve("acme", "d", 5, now=NOON)


def test_two_replicas_reserving_concurrently_never_pass_the_budget(ray_session, tmp_path):
    """Two Ray actors stand in for two pipeline replicas, each firing 100 reservations at
    once for the same tenant; the budget is 50."""
    import ray

    from serve_apps.quota import authority

    config = QuotaConfig(default=TenantLimits(requests_per_day=50, tokens_per_day=None,
                                              requests_per_second=None))
    quota = authority(config, tmp_path / "quota.json")

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self, quota):
            self.quota = quota

        def ready(self) -> bool:
            return True

        def burst(self, name: str, n: int) -> list[str]:
            """The request ids the authority accepted."""
            answers = ray.get([self.quota.reserve.remote("acme", f"{name}-{i}", 1)
                               for i in range(n)])
            return [f"{name}-{i}" for i, a in enumerate(answers) if "refused" not in a]

    try:
        replicas = [Replica.remote(quota) for _ in range(2)]
        ray.get([r.ready.remote() for r in replicas])  # both up before either fires
        accepted = ray.get([r.burst.remote(f"replica{k}", 100) for k, r in enumerate(replicas)])
        assert sum(map(len, accepted)) == 50, accepted
        refused = ray.get(quota.reserve.remote("acme", "one-more", 1))
        assert refused["headers"]["RateLimit-Remaining"] == "0" and "Retry-After" in \
            refused["headers"]
        some = (accepted[0] or accepted[1])[0]
        ray.get(quota.refund.remote("acme", some))  # a failed request gives its unit back
        assert "refused" not in ray.get(quota.reserve.remote("acme", "after-refund", 1))
        assert Ledger(config, tmp_path / "quota.json").usage["acme"].requests == 50
    finally:
        ray.kill(quota)


def test_a_corrupt_ledger_is_moved_aside_and_the_authority_starts_afresh(tmp_path):
    path = tmp_path / "quota.json"
    path.write_text('{"acme": {"day": "2026-11-25", "requests": 3')  # cut off mid-write
    ledger = _ledger(tmp_path, requests_per_day=5)
    assert ledger.usage == {} and not path.exists()
    [aside] = tmp_path.glob("quota.json.corrupt-*")
    assert aside.read_text().startswith('{"acme"')  # kept for an operator to inspect
    ledger.reserve("acme", "r1", 1, now=NOON)  # serving, not crash-looping
    assert _ledger(tmp_path, requests_per_day=5).usage["acme"].requests == 1
