"""Personal data found in text and replaced by a typed placeholder (`[EMAIL]`, `[CARD]`, ...).

Card numbers must pass the Luhn check and IBANs the ISO 13616 mod-97 check, so order numbers and
amounts are not mistaken for them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class PiiKind:
    name: str
    pattern: re.Pattern
    valid: Callable[[str], bool] = lambda _: True


KINDS = [
    PiiKind("EMAIL", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    PiiKind("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
            lambda m: iban_ok(m.replace(" ", ""))),
    PiiKind("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"),
            lambda m: luhn_ok(re.sub(r"\D", "", m))),
    PiiKind("PHONE", re.compile(r"(?<![\w])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?"
                                r"\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w])"),
            lambda m: 7 <= sum(c.isdigit() for c in m) <= 15 and not _DATE.fullmatch(m)),
]


@dataclass(frozen=True)
class Redaction:
    text: str
    found: dict[str, int]


def redact(text: str) -> Redaction:
    """`text` with every e-mail, IBAN, card and phone number replaced, and how many of each."""
    found: dict[str, int] = {}
    for kind in KINDS:
        def _sub(m: re.Match, kind: PiiKind = kind) -> str:
            if not kind.valid(m.group(0)):
                return m.group(0)
            found[kind.name] = found.get(kind.name, 0) + 1
            return f"[{kind.name}]"

        text = kind.pattern.sub(_sub, text)
    return Redaction(text, found)
