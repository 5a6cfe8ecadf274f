"""What the advisor answers, decided without a language model: the intent classifier's verdict
on the question (`advisor-intent`), the slots read from it (`serve_apps/slots.py`) and the
guardrail findings make a `Plan`; the plan is a tool call (`simulate_portfolio`) or an answer
of its own, and `reply` writes the text once the tool's result is there.

- `simulate`: with holdings and a horizon read, the tool call (never guessed arguments: what
  is missing, or what the simulation refuses, is asked about instead); a follow-up takes what
  it leaves out from the client's earlier messages, and its answer says which;
- `explain`: the glossary's entries for the measures the question names;
- `recommend`: the refusal. A personalised product recommendation is refused whenever the
  classifier says `recommend` (or keeps it among its candidates) or the `advice` guardrail
  finds one, so a question that asks for both a simulation and a product tip gets the
  simulation and the refusal;
- `other`: the configured reply about the service.
Every answer ends with the disclaimer, and passes the numbers check (`serve_apps/quoting.py`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve_apps.portfolio import InvalidPortfolio, SimulationRequest, request_of
from serve_apps.quoting import TEMPLATE_TEXT, compose
from serve_apps.slots import extract, gives

TOOL = "simulate_portfolio"
SPEC = {"type": "function", "function": {
    "name": TOOL,
    "description": "Monte Carlo simulation of a portfolio over a horizon: expected and median "
                   "return, volatility, Sharpe ratio, VaR and CVaR at 95% and 99%, drawdowns, "
                   "the probability of ending below a target, and a rebalancing within the "
                   "risk profile's bounds. Seeded: the same arguments give the same figures.",
    "parameters": SimulationRequest.model_json_schema()}}

GLOSSARY = [  # (what it explains, the words that ask for it, the explanation)
    ("cvar", r"\bc-?var\b|conditional value at risk|expected shortfall|tail loss",
     "CVaR (expected shortfall) at 95% is the average loss over the worst 5% of simulated "
     "outcomes: it says how bad the bad cases are, where VaR only says where they begin."),
    ("var", r"\bvar\b|value at risk",
     "Value at risk (VaR) at 95% is the loss that 95% of the simulated outcomes over the "
     "horizon stay within: one outcome in 20 loses more. At 99% it is one in 100."),
    ("sharpe", r"\bsharpe\b|risk[- ]adjusted return",
     "The Sharpe ratio is the annual return above the risk-free rate divided by the annual "
     "volatility: the return earned per unit of risk. It compares portfolios; higher is better, "
     "and it promises nothing about a single year."),
    ("drawdown", r"draw ?downs?|peak to trough",
     "The maximum drawdown of a path is its largest fall from an earlier peak within the "
     "horizon; answers give its average over the simulated paths and the level only one path "
     "in 20 exceeds."),
    ("volatility", r"volatil|standard deviation|swings?\b",
     "Volatility is the annualised standard deviation of the portfolio's returns: how widely "
     "they swing around their mean. Higher volatility widens both the gains and the losses."),
    ("return", r"expected return|mean return|median|average return",
     "The expected return is the average total return over the horizon across the simulated "
     "paths; the median is the middle outcome, lower than the mean when a few paths do very "
     "well."),
    ("method", r"simulat|assum|monte carlo|how do (?:you|your)|model|rebalanc|profile|work",
     "Each simulation draws many paths of monthly returns for the asset classes you hold "
     "{method}, rebalances your portfolio to its weights every period and reports the spread of "
     "outcomes. A rebalancing suggestion maximises the expected return less a penalty on "
     "variance, long only, within your risk profile's bounds, and only over what you hold."),
]
_METHODS = {"gbm": "from long-run assumptions of their returns, volatilities and correlations "
                   "(correlated geometric Brownian motion)",
            "bootstrap": "by drawing whole periods at random from the historical returns "
                         "configured (a bootstrap)"}
_GENERAL = ("I can explain value at risk, CVaR, the Sharpe ratio, drawdowns, volatility, "
            "expected returns and how the simulations work.")
_ASK = {"holdings": "your holdings with their weights (for example 60% SPY and 40% IEF; "
                    "tickers such as {tickers} or asset classes such as {assets})",
        "horizon_years": "the horizon (for example 10 years)"}


FOLLOW_UPS = 4  # the client's newest earlier messages a question's intent may carry from


@dataclass
class Plan:
    """What to answer: a tool call (`arguments`) or text of its own, and a refusal beside."""

    intent: str
    arguments: dict | None = None
    text: str | None = None
    refused: bool = False
    missing: list[str] = field(default_factory=list)
    problem: str | None = None  # why the read arguments cannot be simulated
    carried: list[str] = field(default_factory=list)  # arguments from earlier messages

    @property
    def action(self) -> str:
        if self.arguments is not None:
            return "simulate"
        if self.missing or self.problem:
            return "ask"
        return {"explain": "explain", "recommend": "refuse"}.get(self.intent, "answer")


def intent_of(text: str, verdict: dict, before: str | None, config) -> str:
    """A message's intent: the classifier's `verdict`, except for a follow-up of a simulation
    that only changes its arguments ("and over 20 years?"). Read alone, such a message asks
    for nothing (`other`) or leaves the classifier unsure whether it asks to simulate; it gives
    an argument, and the conversation's intent (`before`) was to simulate, so that intent
    carries (dialogue state tracking). A confident other intent, and any request for a
    recommendation, stay what they are."""
    label, candidates = verdict["label"], verdict.get("candidates") or [verdict["label"]]
    unsure = label == "other" or (len(candidates) > 1 and "simulate" in candidates)
    if before == "simulate" and label != "recommend" and unsure and gives(text, config.portfolio):
        return "simulate"
    return label


def conversation_intent(earlier: Sequence[tuple[str, dict]], config) -> str | None:
    """The task the conversation is in after the client's earlier messages (each with its
    verdict, oldest first): the newest simulation or recommendation asked for, each message
    read as a follow-up of the ones before (`intent_of`). A question about a term, or anything
    else, is an aside that leaves the task as it was."""
    task = None
    for text, verdict in earlier:
        intent = intent_of(text, verdict, task, config)
        task = intent if intent in ("simulate", "recommend") else task
    return task


def refuses(verdict: dict, advice_found: bool) -> bool:
    """Whether a product recommendation is refused: the `advice` guardrail found a request for
    one, or the classifier reads one (or keeps it among its candidates)."""
    return advice_found or "recommend" in (verdict.get("candidates") or [verdict["label"]])


def plan(question: str, verdict: dict, advice_found: bool, config,
         earlier: Sequence[str] = (), before: str | None = None) -> Plan:
    """The plan for `question` (`config`: the advisor's `AdvisorAppConfig`; `earlier`: the
    client's earlier messages of the conversation, oldest first; `before`: the intent they
    left the conversation in, `conversation_intent`)."""
    intent = intent_of(question, verdict, before, config)
    out = Plan(intent, refused=refuses(verdict, advice_found))
    if intent == "simulate":
        slots = extract(question, config.portfolio, earlier)
        out.missing = slots.missing
        out.carried = (["intent"] if intent != verdict["label"] else []) + slots.carried
        if not slots.missing:
            arguments = slots.arguments({"paths": config.paths, "seed": config.seed})
            try:
                out.arguments = request_of(arguments, config.portfolio).model_dump()
            except InvalidPortfolio as exc:
                out.problem = str(exc)
        if out.missing:
            names = config.portfolio
            asks = [_ASK[m].format(tickers=", ".join(sorted(names.tickers)[:4]),
                                   assets=", ".join(names.names[:2])) for m in out.missing]
            out.text = f"To simulate your portfolio I need {' and '.join(asks)}."
        elif out.problem:
            out.text = unsimulated(out.problem)
    elif intent == "explain":
        out.text = explain(question, config.portfolio.method)
    elif intent == "other":
        out.text = config.other_reply
    return out


def unsimulated(problem: str) -> str:
    """The answer to a portfolio the simulation refuses."""
    return f"I could not simulate that portfolio: {problem}."


def explain(question: str, method: str) -> str:
    """The glossary's entries the question asks for (two at most), else what it can explain."""
    found = [text for _, words, text in GLOSSARY if re.search(words, question, re.IGNORECASE)]
    return " ".join(found[:2]).format(method=_METHODS[method]) if found else _GENERAL


def reply(p: Plan, result: dict | None, config) -> str:
    """The answer's text: the plan's own (or the simulation quoted), the refusal, the
    disclaimer."""
    parts = [compose(result, p.arguments["horizon_years"]) if result is not None else p.text]
    if p.carried and p.arguments is not None:
        parts.insert(0, f"As in your earlier messages: {_carried(p)}.")
    if p.refused:
        parts.append(config.refusal)
    return " ".join([part for part in parts if part] + [config.disclaimer])


def _carried(p: Plan) -> str:
    """What a follow-up took from earlier messages, in words (no figure: those are the tool's)."""
    said = {"intent": "a simulation",
            "holdings": f"your holdings ({', '.join(p.arguments['holdings'])})",
            "horizon_years": "the horizon",
            "risk_profile": f"the {p.arguments.get('risk_profile')} profile"}
    return ", ".join(said[name] for name in p.carried)


def fixed_text(config) -> str:
    """Every number an answer may hold that is neither the tool's nor the client's: the
    templates, the glossary, the configured replies."""
    return " ".join([TEMPLATE_TEXT, *(text for _, _, text in GLOSSARY), _GENERAL,
                     *_ASK.values(), config.refusal, config.other_reply, config.disclaimer])
