"""The advisor's slot extraction: the holdings, horizon and profile of a simulation read from
what clients write, and what is missing named, never guessed."""

import pytest

from serve_apps.http import InvalidRequest
from serve_apps.portfolio import request_of
from serve_apps.portfolio_config import PortfolioConfig
from serve_apps.slots import extract
from training import data
from training.data.advisor import HOLDINGS, SLOTS

CONFIG = PortfolioConfig()


@pytest.mark.parametrize("written", HOLDINGS + ["SPY 50% IEF 50%", "put 0.6 in spy and 0.4 "
                                                "into ief", "us equity 70 percent, cash 30%"])
def test_every_way_of_writing_holdings_is_read_as_weights_summing_to_one(written):
    slots = extract(f"Simulate {written} over 10 years with a growth profile.", CONFIG)
    assert sum(slots.holdings.values()) == pytest.approx(1)
    assert slots.horizon_years == 10 and slots.risk_profile == "growth" and not slots.missing
    request_of(slots.arguments({"paths": 1000}), CONFIG)  # a request the simulation accepts


def test_holdings_and_their_weights_are_paired_as_written():
    assert extract("60% SPY and 40% IEF", CONFIG).holdings == {"SPY": 0.6, "IEF": 0.4}
    assert extract("SPY 0.25, gold 0.75", CONFIG).holdings == {"SPY": 0.25, "gold": 0.75}
    assert extract("20% spy, 30% VTI, 50% us equity", CONFIG).holdings == {
        "SPY": 0.2, "VTI": 0.3, "us_equity": 0.5}


@pytest.mark.parametrize("written, years", [
    ("over 5 years", 5), ("for the next 3 years", 3), ("18 months", 1.5), ("one year", 1),
    ("a 30-year horizon", 30), ("next 2.5 yrs", 2.5)])
def test_horizons_in_years_or_months(written, years):
    assert extract(f"60% SPY and 40% IEF {written}", CONFIG).horizon_years == years


def test_what_cannot_be_read_is_missing_not_guessed():
    slots = extract("How risky is half SPY, half bonds?", CONFIG)
    assert slots.holdings == {} and slots.horizon_years is None and slots.risk_profile is None
    assert slots.missing == ["holdings", "horizon_years"]
    assert extract("60% SPY and 40% XYZ over 5 years", CONFIG).holdings == {"SPY": 0.6}


def test_generated_simulation_requests_give_simulations_the_settings_accept():
    """Most read whole; a typo in a ticker, a weight or a unit ("yaers") gives a missing slot or
    a request refused with its reason (the chatbot asks again), never a wrong simulation."""
    df = data.generate("advisor-questions", "base", 600, seed=4)
    read = [extract(t, CONFIG) for t in df[df.intent.str.startswith("simulate")].text]
    accepted = 0
    for slots in read:
        if slots.missing:
            continue
        assert slots.horizon_years in {extract(h, CONFIG).horizon_years for h in SLOTS["horizon"]}
        try:
            request_of(slots.arguments({"paths": 1000}), CONFIG)
            accepted += 1
        except InvalidRequest as exc:
            assert "weights sum to" in str(exc)
    assert accepted > 0.8 * len(read)
