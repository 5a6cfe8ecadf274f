"""Guardrails: rules that look at a text before the models see it (input) or before it leaves
(output), each with a configured action: `block` refuses the request (422), `redact` replaces
what matched by a placeholder, `flag` only reports it. Every hit is a `Finding`, returned in the
response metadata and logged.

Four kinds of rule, one shape (a scan that returns the text with its matches replaced, and how
many of each it found):
- `denylist`: the configured regular expressions;
- `injection`: heuristics for prompt injection (instructions to ignore instructions, requests
  for the system prompt, role-play jailbreaks, chat-template tokens);
- `pii`: e-mail addresses, phone numbers, card numbers passing the Luhn check and IBANs passing
  mod-97 (`serve_apps/pii.py`);
- `bias`: a lexicon of protected attributes (race and ethnicity, religion, gender, age,
  disability, nationality, sexual orientation) mentioned in generated text. A mention is not
  bias; the flag marks answers a reviewer should read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from serve_apps.config import GuardrailRule
from serve_apps.pii import Redaction, redact
from training.errors import LLMOpsError

INJECTION = {
    "ignore-instructions": r"\b(?:ignore|disregard|forget|override)\b[^.\n]{0,40}\b(?:previous|"
                           r"prior|above|earlier|all|your)\b[^.\n]{0,20}\b(?:instructions|rules|"
                           r"prompts?|directions|guidelines)\b",
    "reveal-prompt": r"\b(?:reveal|show|print|repeat|leak)\b[^.\n]{0,30}\b(?:system|hidden|"
                     r"initial|original)\s+(?:prompt|instructions|message)\b",
    "role-override": r"\byou are now\b|\bfrom now on,? you\b|\bpretend (?:to be|you are)\b|"
                     r"\bact as (?:an? )?(?:unfiltered|uncensored|unrestricted)\b",
    "jailbreak": r"\b(?:developer|jailbreak|god|dan)\s+mode\b|\bdo anything now\b",
    "template-tokens": r"<\|?(?:system|im_start|im_end|endoftext)\|?>|\[/?INST\]",
}

PROTECTED = {
    "race-ethnicity": ["black people", "white people", "asian", "asians", "hispanic", "latino",
                       "latina", "arab", "arabs", "caucasian", "african american"],
    "religion": ["muslim", "muslims", "christian", "christians", "jew", "jews", "jewish",
                 "hindu", "hindus", "buddhist", "atheist", "atheists"],
    "gender": ["women", "woman", "men", "female", "females", "male", "males", "transgender",
               "non-binary", "nonbinary"],
    "age": ["elderly", "old people", "boomers", "young people", "millennials"],
    "disability": ["disabled", "handicapped", "blind people", "deaf people", "autistic",
                   "mentally ill"],
    "nationality": ["immigrants", "foreigners", "refugees", "migrants"],
    "sexual-orientation": ["gay", "gays", "lesbian", "lesbians", "bisexual", "homosexual",
                           "homosexuals", "queer"],
}


class Blocked(LLMOpsError):
    """A text a `block` rule caught: 422, naming the rule (never the matched text)."""

    status = 422


@dataclass(frozen=True)
class Finding:
    rule: str
    kind: str
    action: str
    where: str          # input / output
    item: int           # which text of the request
    found: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_scan(patterns: dict[str, str], placeholder: str) -> Callable[[str], Redaction]:
    compiled = {label: re.compile(p, re.IGNORECASE) for label, p in patterns.items()}

    def scan(text: str) -> Redaction:
        found: dict[str, int] = {}
        for label, pattern in compiled.items():
            text, n = pattern.subn(placeholder, text)
            if n:
                found[label] = n
        return Redaction(text, found)

    return scan


@functools.cache
def _bias_patterns() -> dict[str, str]:
    return {category: r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
            for category, words in PROTECTED.items()}


def scanner(rule: GuardrailRule) -> Callable[[str], Redaction]:
    """The rule's scan: the text with its matches replaced, and what it found."""
    if rule.kind == "pii":
        return redact
    if rule.kind == "injection":
        return _pattern_scan(INJECTION, "[REMOVED]")
    if rule.kind == "bias":
        return _pattern_scan(_bias_patterns(), "[PROTECTED]")
    return _pattern_scan({f"pattern-{i}": p for i, p in enumerate(rule.patterns)}, "[DENIED]")


class Guardrails:
    """One side's rules (input or output) of an application, in their declared order."""

    def __init__(self, rules: Sequence[GuardrailRule], where: str):
        self.where = where
        self.rules = [(rule, scanner(rule)) for rule in rules]

    def check(self, texts: Sequence[str | None]) -> tuple[list[str | None], list[Finding]]:
        """The texts as they may go on, and every finding; raises `Blocked` at the first text a
        `block` rule catches. A None (no text, e.g. a blocked post) stays None."""
        out, findings = [], []
        for item, text in enumerate(texts):
            for rule, scan in self.rules if text is not None else ():
                result = scan(text)
                if not result.found:
                    continue
                findings.append(Finding(rule.name, rule.kind, rule.action, self.where, item,
                                        result.found))
                if rule.action == "block":
                    raise Blocked(f"{self.where} text {item} was refused by guardrail "
                                  f"{rule.name!r} ({', '.join(sorted(result.found))})")
                if rule.action == "redact":
                    text = result.text
            out.append(text)
        return out, findings
