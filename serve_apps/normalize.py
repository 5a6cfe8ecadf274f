"""Text as the guardrails read it: formatting tricks undone before any rule runs, so a rule
written for plain text also catches its obfuscated forms.

`normalize` (every rule): lone surrogates become U+FFFD; Unicode tag characters (invisible
"ASCII smuggling") become the ASCII they encode; NFKC folds full-width and other compatibility
forms (`ｉｇｎｏｒｅ`, `＠`, `①`); format characters (zero-width spaces and joiners, bidi
controls, soft hyphens, BOM) and Hangul fillers are removed; digits of every script become ASCII
digits; every kind of space becomes a plain space.

`skeleton` (the injection rules): `normalize`, then lower case, combining marks dropped,
Cyrillic and Greek letters that look Latin folded to them (`іgnоre`), digits and symbols used
as letters inside words (`1gn0re`, `@ll`) read as letters, and words spelled out letter by
letter (`i g n o r e`) joined.
"""

from __future__ import annotations

import re
import unicodedata

_INVISIBLE = {0x115F, 0x1160, 0x3164, 0xFFA0, 0x180E}  # fillers that render as nothing
_TAGS = range(0xE0000, 0xE0080)

_HOMOGLYPHS = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w",
})
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s",
         "!": "i", "|": "l", "+": "t"}
_LEET_IN_WORD = re.compile(r"(?<=[a-z])[013457@$!|+]+|[013457@$!|+]+(?=[a-z])")
_SPELLED = re.compile(r"\b[a-z](?:[ .\-_*/][a-z]\b)+")
_SPACES = re.compile(r"\s+")


def _valid(text: str) -> str:
    """Lone surrogates (which no encoder accepts) as U+FFFD; a proper pair joined."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def normalize(text: str) -> str:
    """`text` with its formatting tricks undone (see the module docstring). ASCII text comes
    back as it is, at no cost."""
    if text.isascii():
        return text
    text = _valid(text)
    text = "".join(chr(ord(c) - 0xE0000) if ord(c) in _TAGS else c for c in text)
    text = unicodedata.normalize("NFKC", text)
    out = []
    for c in text:
        category = unicodedata.category(c)
        if category == "Cf" or ord(c) in _INVISIBLE:
            continue
        if category == "Nd":
            out.append(str(unicodedata.decimal(c)))
        elif category in ("Zl", "Zp"):
            out.append("\n")
        elif category == "Zs" or c in "\t\r\v\f":
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


def skeleton(text: str) -> str:
    """What a text says once disguises of its letters are undone (for pattern rules)."""
    text = unicodedata.normalize("NFD", normalize(text).lower())
    text = "".join(c for c in text if not unicodedata.combining(c)).translate(_HOMOGLYPHS)
    text = _LEET_IN_WORD.sub(lambda m: "".join(_LEET[c] for c in m.group(0)), text)
    text = _SPELLED.sub(lambda m: re.sub(r"[^a-z]", "", m.group(0)), text)
    return _SPACES.sub(" ", text)
