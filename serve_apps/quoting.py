"""Advisor answers that quote a simulation's figures exactly: the answer composed from the
tool's result, and the check every answer passes before it leaves, whoever wrote it (the
template here, or a language model): each number in it must be a correct rounding of a figure
the tool returned or a number the client wrote. An invented figure is refused, never sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from serve_apps.http import InvalidOutput

# a number as written: 1,200 / 32.4 / 0.05, optionally a percentage
_NUMBER = re.compile(r"(?<![\w.])(-?\d{1,3}(?:,\d{3})+|-?\d+(?:\.\d+)?)(\s*%)?")

_SHOWN = [("expected_return", "an expected return of {}"), ("median_return", "a median of {}"),
          ("volatility", "annual volatility of {}"), ("sharpe_ratio", "a Sharpe ratio of {}"),
          ("var_95", "a 95% value at risk of {}"), ("cvar_95", "a 95% CVaR of {}"),
          ("var_99", "a 99% value at risk of {}"), ("cvar_99", "a 99% CVaR of {}"),
          ("max_drawdown", "an average maximum drawdown of {}")]
QUOTED = [name for name, _ in _SHOWN] + ["probability_below_target"]  # what `compose` needs
_RATIOS = {"sharpe_ratio"}  # quoted as numbers; every other figure as a percentage
# the template's own words ("a 95% value at risk"): numbers an answer may always hold
TEMPLATE_TEXT = " ".join(text for _, text in _SHOWN)


class InventedFigure(InvalidOutput):
    """An answer quoted a number that neither the tool nor the client gave: not sent (502)."""


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _quoted(name: str, value: float) -> str:
    return f"{value:.2f}" if name in _RATIOS else _pct(value)


def compose(result: dict, horizon_years: float) -> str:
    """The answer to a simulation request: the figures over the horizon, and the rebalancing
    with its constraints when the result has one (a client's own tool may return none)."""
    figures = result["figures"]
    years = f"{horizon_years:g} year{'s' if horizon_years != 1 else ''}"
    parts = [f"Over {years}, {result['request']['paths']:,} simulated paths give "
             + ", ".join(text.format(_quoted(name, figures[name])) for name, text in _SHOWN)
             + f"; the probability of ending below your target is "
             f"{_pct(figures['probability_below_target'])}."]
    rebalance = result.get("rebalance") or {}
    if rebalance.get("weights"):
        weights = ", ".join(f"{k} {_pct(v)}" for k, v in rebalance["weights"].items())
        parts.append(f"Within your profile ({rebalance['constraints']}), a mean-variance "
                     f"rebalancing of what you hold would be {weights}, with an expected annual "
                     f"return of {_pct(rebalance['expected_return'])} and volatility of "
                     f"{_pct(rebalance['volatility'])}.")
    elif rebalance:
        parts.append(f"No rebalancing within your profile: {rebalance['reason']}.")
    return " ".join(parts)


def _numbers(value) -> Iterable[float]:
    """Every number inside a tool result (nested dicts and lists; keys and flags aside)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, str):
        yield from (float(m.group(1).replace(",", "")) for m in _NUMBER.finditer(value))


def _rounds_to(written: str, percent: bool, value: float) -> bool:
    """Whether `written` (a percentage when `percent`) is `value` rounded to its decimals."""
    decimals = len(written.split(".")[1]) if "." in written else 0
    shown = float(written.replace(",", ""))
    target = value * 100 if percent else value
    return abs(shown - target) <= 0.5 * 10 ** -decimals + 1e-9


def invented(answer: str, tool_results: list, client_text: str, fixed_text: str = "") -> list[str]:
    """The numbers of `answer` that are neither a rounding of a tool figure, nor written by the
    client, nor part of `fixed_text` (the disclaimer, the constraint set)."""
    given = {m.group(1) for m in _NUMBER.finditer(client_text + " " + fixed_text)}
    figures = [v for result in tool_results for v in _numbers(result)]
    bad = []
    for m in _NUMBER.finditer(answer):
        written, percent = m.group(1), bool(m.group(2))
        if written in given or any(_rounds_to(written, percent, v) for v in figures):
            continue
        bad.append(m.group(0).strip())
    return bad


def check(answer: str, tool_results: list, client_text: str, fixed_text: str = "") -> str:
    """`answer` if every number in it is supported; else `InventedFigure` naming them."""
    bad = invented(answer, tool_results, client_text, fixed_text)
    if bad:
        raise InventedFigure(f"the answer quoted figures the simulation did not give: "
                             f"{', '.join(bad)}")
    return answer
