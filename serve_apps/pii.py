"""Personal data found in text and replaced by a typed placeholder (`[EMAIL]`, `[CARD]`, ...).

The text is normalised first (`serve_apps/normalize.py`: zero-width characters, full-width
forms, digits of other scripts), so formatting does not hide what it writes. Then, in order:
- e-mail addresses, also with `(at)` / `[at]` and `(dot)` / `[dot]` spelled out;
- IBANs in any case, with or without spaces or dashes, of the length their country uses, passing
  the ISO 13616 mod-97 check;
- card numbers of 13-19 digits with any separators, passing the Luhn check;
- phone numbers: E.164 (`+` and 8-15 digits) and national formats with any separators,
  parentheses or none (7-15 digits; without any separator or `+`, 10-15 digits, so short order
  numbers stay); dates, IPv4 addresses and amounts grouped by dots are not phones.

The checksums keep order numbers and amounts from being mistaken for cards and IBANs. A text
with nothing found comes back exactly as given (not normalised).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from serve_apps.normalize import normalize

# ISO 13616 IBAN lengths by country (SWIFT IBAN registry)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    iban = iban.upper()
    if not iban.isalnum() or not iban.isascii():
        return False
    s = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


# Each finder takes a regex match and returns how many of its characters are the personal
# data (0: none; the search goes on one character later).
Finder = Callable[[re.Match], int]


def _whole(valid: Callable[[str], bool]) -> Finder:
    return lambda m: len(m.group(0)) if valid(m.group(0)) else 0


def _iban(m: re.Match) -> int:
    """The IBAN at the start of the match: as many characters as its country's length (any
    length 15-34 for a country not in the table), the checksum passing."""
    text = m.group(0)
    ends = [i + 1 for i, c in enumerate(text) if c.isalnum()]  # end offset of each character
    known = IBAN_LENGTHS.get(text[:2].upper())
    for n in [known] if known else range(min(34, len(ends)), 14, -1):
        if n <= len(ends):
            candidate = re.sub(r"[^0-9A-Za-z]", "", text[:ends[n - 1]])
            if iban_ok(candidate):
                return ends[n - 1]
    return 0


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"  # of an IPv4 address: 0-255, no leading zero
# numbers that look like phones but are not: dates, IPv4 addresses, amounts grouped by dots;
# standalone (not part of a longer run of digit groups, nor after a country code: "+44 20.00...")
_NOT_PHONES = re.compile(
    r"(?<![\d+])(?<!\d[-/.])(?<!\+\d\s)(?<!\+\d\d\s)(?<!\+\d{3}\s)(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|"
    rf"(?:{_OCTET}\.){{3}}{_OCTET}|\d{{1,3}}(?:\.\d{{3}})+)(?![-/.]?\d)")


def _phone_ok(m: str) -> bool:
    digits = sum(c.isdigit() for c in m)
    if m.isdigit():  # no separator and no `+`: longer than an order number
        return 10 <= digits <= 15
    return (8 if m.startswith("+") else 7) <= digits <= 15


@dataclass(frozen=True)
class PiiKind:
    """`pattern` finds candidates, `find` says how much of one is personal data. A rejected
    candidate is searched again from its next character, or with `whole` skipped whole (a run
    of digit groups too long for a phone is no phone, nor is its tail); `barrier` masks what
    is never this kind before the search."""

    name: str
    pattern: re.Pattern
    find: Finder
    whole: bool = False
    barrier: re.Pattern | None = None


_SEP = r"[ .\-_/\u00a0]{0,2}"
_AT = r"(?:\s?@\s?|\s?[\[({]\s?at\s?[\])}]\s?)"
_DOT = r"(?:\.|\s?[\[({]\s?dot\s?[\])}]\s?)"
KINDS = [
    PiiKind("EMAIL", re.compile(
        rf"[\w.+-]+{_AT}[\w-]+(?:{_DOT}[\w-]+)*{_DOT}[A-Za-z]{{2,}}\b", re.IGNORECASE),
        _whole(lambda _: True)),
    PiiKind("IBAN", re.compile(r"(?<![0-9A-Za-z])[A-Za-z]{2}\d{2}(?:[ -]?[0-9A-Za-z]){11,30}"),
            _iban),
    PiiKind("CARD", re.compile(rf"(?<![\d])\d(?:{_SEP}\d){{12,18}}(?!\d)"),
            _whole(lambda m: luhn_ok(re.sub(r"\D", "", m)))),
    PiiKind("PHONE", re.compile(r"(?<![\w+])(?:\+\s?|00)?(?:\(\d{1,4}\)\s?)?\d(?:[\d \-./]|"
                                r"\(\d{1,4}\)\s?){5,24}\d(?![\w])"),
            _whole(_phone_ok), whole=True, barrier=_NOT_PHONES),
]


@dataclass(frozen=True)
class Redaction:
    text: str
    found: dict[str, int]


def _replace(kind: PiiKind, text: str, found: dict[str, int]) -> str:
    out, pos, done = [], 0, 0
    seen = kind.barrier.sub(lambda m: "\0" * len(m.group(0)), text) if kind.barrier else text
    while (m := kind.pattern.search(seen, pos)) is not None:
        length = kind.find(m)
        if not length:
            pos = m.end() if kind.whole else m.start() + 1
            continue
        out += [text[done:m.start()], f"[{kind.name}]"]
        found[kind.name] = found.get(kind.name, 0) + 1
        pos = done = m.start() + length
    return "".join(out) + text[done:]


def redact(text: str) -> Redaction:
    """`text` with every e-mail, IBAN, card and phone number replaced, and how many of each."""
    found: dict[str, int] = {}
    clean = normalize(text)
    for kind in KINDS:
        clean = _replace(kind, clean, found)
    return Redaction(clean if found else text, found)
