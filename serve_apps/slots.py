"""Slot extraction for the advisor: the arguments of a portfolio simulation read from what a
client wrote ("60% SPY and 40% IEF over the next 10 years, conservative").

Deterministic, so the same question always makes the same tool call (and an audit replay can
trust the recorded arguments). Holdings are the names the portfolio settings know (tickers
and asset classes, any case; "us equity" for `us_equity`) with a weight beside them: a
percentage or a fraction, before or after the name. What cannot be read is listed in
`missing`, for the chatbot to ask about, never guessed. A follow-up ("and over 20 years?")
takes what it leaves out from the client's earlier messages of the conversation, the newest
that has it, and says so (`carried`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from serve_apps.portfolio_config import PortfolioConfig

_NUMBER = r"(\d+(?:\.\d+)?)\s*(%|percent\b)?"
_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
          "eight": 8, "nine": 9, "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30}
_HORIZON = re.compile(r"\b(\d+(?:\.\d+)?|" + "|".join(_WORDS) + r")\s*[- ]?\s*"
                      r"(years?|yrs?|months?)\b", re.IGNORECASE)


@dataclass
class Slots:
    holdings: dict[str, float] = field(default_factory=dict)
    horizon_years: float | None = None
    risk_profile: str | None = None
    missing: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # read from earlier messages

    def arguments(self, defaults: dict) -> dict:
        """The simulation's arguments: what was read, then `defaults` (paths, seed, profile)."""
        return {**defaults, "holdings": self.holdings, "horizon_years": self.horizon_years,
                **({"risk_profile": self.risk_profile} if self.risk_profile else {})}


def _names(config: PortfolioConfig) -> dict[str, str]:
    """Every way a holding may be written (lower case) -> the name the settings know."""
    out = {t.lower(): t for t in config.tickers}
    for name in config.assets:
        out[name.lower()] = name
        out[name.lower().replace("_", " ")] = name
    return out


def _weight(number: str, unit: str | None) -> float:
    value = float(number)
    return value / 100 if unit or value > 1 else value


def holdings(text: str, config: PortfolioConfig) -> dict[str, float]:
    """Name -> weight for every known name with a number beside it: all weights before their
    names ("60% SPY") or all after ("SPY 60%"), whichever reading sums closer to 1 (in "SPY 50%
    IEF 50%" the second number could belong to either name)."""
    names = _names(config)
    alternation = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    name = rf"(?<![\w])({alternation})(?![\w])"
    readings = []
    for pattern, order in ((_NUMBER + r"\s*(?:of|in|into)?\s*" + name, (0, 1, 2)),
                           (name + r"\s*[:=]?\s*" + _NUMBER, (1, 2, 0))):
        found: dict[str, float] = {}
        for m in re.finditer(pattern, text, re.IGNORECASE):
            number, unit, written = (m.group(i + 1) for i in order)
            key = names[written.lower()]
            found[key] = round(found.get(key, 0.0) + _weight(number, unit), 6)
        readings.append(found)
    return min(readings, key=lambda found: (abs(sum(found.values()) - 1), -len(found)))


def horizon_years(text: str) -> float | None:
    m = _HORIZON.search(text)
    if m is None:
        return None
    amount = m.group(1).lower()
    value = float(_WORDS.get(amount) or amount)
    return round(value / 12, 4) if m.group(2).lower().startswith("month") else value


def _read(text: str, config: PortfolioConfig) -> Slots:
    return Slots(holdings(text, config), horizon_years(text), next(
        (p for p in config.profiles if re.search(rf"\b{re.escape(p)}\b", text, re.IGNORECASE)),
        None))


def gives(text: str, config: PortfolioConfig) -> bool:
    """Whether `text` gives any of the simulation's arguments (holdings, a horizon, a profile)."""
    slots = _read(text, config)
    return bool(slots.holdings or slots.horizon_years is not None or slots.risk_profile)


def extract(text: str, config: PortfolioConfig, earlier: Sequence[str] = ()) -> Slots:
    """The simulation's arguments found in `text`, or else in the newest of the `earlier`
    messages (oldest first) that has them, and the names of those found in neither."""
    slots = _read(text, config)
    for before in reversed(earlier):
        old = _read(before, config)
        for name in ("holdings", "horizon_years", "risk_profile"):
            if not getattr(slots, name) and getattr(old, name):
                setattr(slots, name, getattr(old, name))
                slots.carried.append(name)
    if not slots.holdings:
        slots.missing.append("holdings")
    if slots.horizon_years is None:
        slots.missing.append("horizon_years")
    return slots
