"""Advisor answers quote the simulation exactly: the composed answer passes the numbers check,
and an invented or misquoted figure is refused before it leaves."""

import pytest

from serve_apps.portfolio import simulate
from serve_apps.portfolio_config import PortfolioConfig
from serve_apps.quoting import TEMPLATE_TEXT, InventedFigure, check, compose, invented

CLIENT = "How risky is 60% SPY and 40% IEF over the next 10 years? I'm a balanced investor."
DISCLAIMER = "Simulated figures, not advice."


@pytest.fixture(scope="module")
def result():
    return simulate({"holdings": {"SPY": 0.6, "IEF": 0.4}, "horizon_years": 10,
                     "paths": 2000, "seed": 5}, PortfolioConfig(), workers=0)


def test_the_composed_answer_quotes_every_figure_and_passes_the_check(result):
    answer = f"{compose(result, 10)} {DISCLAIMER}"
    assert check(answer, [result], CLIENT, TEMPLATE_TEXT + DISCLAIMER) == answer
    figures = result["figures"]
    assert f"{figures['var_95'] * 100:.1f}%" in answer
    assert f"{figures['sharpe_ratio']:.2f}" in answer and answer.endswith(DISCLAIMER)
    assert "2,000 simulated paths" in answer and "balanced" in answer


def test_an_invented_or_misquoted_figure_is_refused(result):
    answer = f"{compose(result, 10)} {DISCLAIMER}"
    quoted = f"{result['figures']['var_95'] * 100:.1f}%"
    wrong = f"{result['figures']['var_95'] * 100 + 3:.1f}%"
    with pytest.raises(InventedFigure, match=wrong.replace(".", r"\.")) as refused:
        check(answer.replace(quoted, wrong), [result], CLIENT, TEMPLATE_TEXT + DISCLAIMER)
    assert refused.value.status == 502
    assert invented(answer + " Returns of 12% a year are guaranteed.", [result], CLIENT,
                    TEMPLATE_TEXT + DISCLAIMER) == ["12%"]
    # the client's own numbers may be repeated; a rounding to fewer decimals is still exact
    assert invented("You hold 60% SPY over 10 years.", [result], CLIENT) == []
    assert invented(f"VaR about {result['figures']['var_95'] * 100:.0f}%", [result], "") == []
