"""The advisor's portfolio simulation: figures against closed forms, the same figures for a seed
whatever the number of Ray tasks, a bootstrap of a returns CSV, the rebalancing's bounds, and
bad requests refused with one clear 422 error."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from serve_apps.http import InvalidRequest
from serve_apps.portfolio import InvalidPortfolio, simulate
from serve_apps.portfolio_config import PortfolioConfig

ONE = {"assets": {"x": {"expected_return": 0.08, "volatility": 0.2, "equity": True}},
       "correlations": {}, "tickers": {}}


def test_one_lognormal_asset_matches_its_closed_form_var_and_cvar():
    """One asset under GBM: its horizon log return is N((mu - s^2/2) T, s^2 T) exactly."""
    config = PortfolioConfig.model_validate(ONE)
    out = simulate({"holdings": {"x": 1.0}, "horizon_years": 2, "paths": 200_000, "seed": 3},
                   config, workers=0)["figures"]
    m, s = (0.08 - 0.2 ** 2 / 2) * 2, 0.2 * math.sqrt(2)
    assert out["expected_return"] == pytest.approx(math.exp(0.08 * 2) - 1, abs=0.005)
    for level in (0.95, 0.99):
        q = m + s * norm.ppf(1 - level)
        var = -(math.exp(q) - 1)
        # E[e^X | X <= q] for X ~ N(m, s^2)
        tail = math.exp(m + s ** 2 / 2) * norm.cdf((q - m - s ** 2) / s) / (1 - level)
        tag = round(level * 100)
        assert out[f"var_{tag}"] == pytest.approx(var, abs=0.006), level
        assert out[f"cvar_{tag}"] == pytest.approx(1 - tail, abs=0.008), level
    assert out["probability_below_target"] == pytest.approx(norm.cdf(-m / s), abs=0.004)
    assert out["volatility"] == pytest.approx(0.2, rel=0.03)
    assert out["sharpe_ratio"] == pytest.approx((0.08 - 0.02) / 0.2, rel=0.05)
    assert 0 < out["max_drawdown"] < out["max_drawdown_p95"] < 1


def test_the_same_seed_gives_the_same_figures_whatever_the_number_of_ray_tasks(ray_session):
    config = PortfolioConfig(block_paths=1000)
    request = {"holdings": {"SPY": 0.5, "VXUS": 0.2, "IEF": 0.3}, "horizon_years": 3,
               "paths": 7500, "seed": 11, "target_return": 0.1}
    runs = [simulate(request, config, workers=w) for w in (0, 1, 3, 8)]
    assert all(r == runs[0] for r in runs[1:])
    assert simulate({**request, "seed": 12}, config, workers=2)["figures"] != runs[0]["figures"]
    assert runs[0]["asset_classes"] == {"us_equity": 0.5, "intl_equity": 0.2, "govt_bonds": 0.3}


def test_a_bootstrap_draws_whole_periods_of_the_returns_csv(tmp_path):
    """Constant periods give the closed form exactly; two alternating ones bound every path."""
    csv = tmp_path / "returns.csv"
    csv.write_text("x\n0.01\n0.01\n0.01\n")
    config = PortfolioConfig.model_validate({**ONE, "method": "bootstrap",
                                             "returns_csv": str(csv)})
    out = simulate({"holdings": {"x": 1}, "horizon_years": 1, "paths": 500}, config,
                   workers=0)["figures"]
    assert out["expected_return"] == pytest.approx(1.01 ** 12 - 1, abs=1e-6)
    assert out["var_99"] == pytest.approx(-(1.01 ** 12 - 1), abs=1e-6)
    assert out["max_drawdown"] == 0 and out["probability_below_target"] == 0
    csv.write_text("x\n0.05\n-0.04\n")
    out = simulate({"holdings": {"x": 1}, "horizon_years": 1, "paths": 2000}, config,
                   workers=0)["figures"]
    assert 1.05 ** 12 - 1 >= out["expected_return"] >= 0.96 ** 12 - 1
    assert 0 < out["max_drawdown"] <= 1 - 0.96 ** 12 + 1e-9
    csv.write_text("y\n0.01\n0.02\n")
    with pytest.raises(InvalidPortfolio, match="returns_csv needs a full column"):
        simulate({"holdings": {"x": 1}, "horizon_years": 1}, config, workers=0)


def test_the_rebalancing_keeps_the_profile_bounds_and_follows_the_risk_aversion():
    config = PortfolioConfig()
    for profile in config.profiles:
        out = simulate({"holdings": {"us_equity": 0.7, "em_equity": 0.1, "govt_bonds": 0.1,
                                     "cash": 0.1}, "horizon_years": 1, "paths": 100,
                        "risk_profile": profile}, config, workers=0)["rebalance"]
        bounds = config.profiles[profile]
        w = out["weights"]
        assert sum(w.values()) == pytest.approx(1, abs=1e-3), profile
        assert all(bounds.min_weight - 1e-3 <= v <= bounds.max_weight + 1e-3 for v in w.values())
        assert w["us_equity"] + w["em_equity"] <= bounds.max_equity + 1e-3
        assert profile in out["constraints"] and "long only" in out["constraints"]
    vols = [simulate({"holdings": {"us_equity": 0.4, "govt_bonds": 0.3, "cash": 0.3},
                      "horizon_years": 1,
                      "paths": 100, "risk_profile": p}, config, workers=0)["rebalance"]
            ["volatility"] for p in ("growth", "balanced", "conservative")]
    assert vols[0] > vols[1] > vols[2]  # more risk aversion, less volatility
    # one equity class cannot meet a 40% equity cap: no suggestion, and why
    out = simulate({"holdings": {"SPY": 1}, "horizon_years": 1, "paths": 100,
                    "risk_profile": "conservative"}, config, workers=0)["rebalance"]
    assert out["weights"] is None and "cannot meet" in out["reason"]


@pytest.mark.parametrize("change, message", [
    ({"holdings": {"SPY": 0.5, "IEF": 0.4}}, "weights sum to 0.9"),
    ({"holdings": {"SPY": 0.5, "NOPE": 0.5}}, "unknown assets ['NOPE']"),
    ({"holdings": {"SPY": 1.5, "IEF": -0.5}}, "not negative"),
    ({"horizon_years": -1}, "horizon_years"),
    ({"horizon_years": 80}, "horizon_years: at most 50"),
    ({"paths": 10 ** 7}, "paths: at most 200000"),
    ({"risk_profile": "yolo"}, "unknown risk_profile 'yolo'"),
    ({"leverage": 2}, "leverage"),
    ({"holdings": {}}, "holdings"),
])
def test_bad_requests_are_refused_with_one_clear_422(change, message):
    request = {"holdings": {"SPY": 0.6, "IEF": 0.4}, "horizon_years": 5, **change}
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[")) as caught:
        simulate(request, PortfolioConfig(), workers=0)
    assert caught.value.status == 422 and "\n" not in str(caught.value)


def test_bad_configurations_name_what_is_wrong():
    with pytest.raises(ValueError, match="positive definite"):
        PortfolioConfig.model_validate({**ONE, "assets": {
            "a": {"expected_return": 0.05, "volatility": 0.1},
            "b": {"expected_return": 0.05, "volatility": 0.1},
            "c": {"expected_return": 0.05, "volatility": 0.1}},
            "correlations": {"a": {"b": 0.9, "c": 0.9}, "b": {"c": -0.9}}})
    with pytest.raises(ValueError, match="ticker 'SPY' maps to 'us_equity'"):
        PortfolioConfig.model_validate({**ONE, "tickers": {"SPY": "us_equity"}})
    with pytest.raises(ValueError, match="bootstrap needs returns_csv"):
        PortfolioConfig.model_validate({**ONE, "method": "bootstrap"})
    assert np.allclose(PortfolioConfig().correlation_matrix(),
                       PortfolioConfig().correlation_matrix().T)
