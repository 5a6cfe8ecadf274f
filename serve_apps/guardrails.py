"""Guardrails: rules that look at a text before the models see it (input) or before it leaves
(output), each with a configured action: `block` refuses the request (422), `redact` replaces
what matched by a placeholder, `flag` only reports it. Every hit is a `Finding`, returned in the
response metadata and logged.

Five kinds of rule, one shape (a scan that returns the text with its matches replaced, and how
many of each it found):
- `denylist`: the configured regular expressions;
- `injection`: heuristics for prompt injection (instructions to ignore instructions, requests
  for the system prompt, role-play jailbreaks, chat-template tokens);
- `pii`: e-mail addresses, phone numbers, card numbers passing the Luhn check and IBANs passing
  mod-97 (`serve_apps/pii.py`);
- `bias`: a lexicon of protected attributes (race and ethnicity, religion, gender, age,
  disability, nationality, sexual orientation) mentioned in generated text. A mention is not
  bias; the flag marks answers a reviewer should read;
- `advice`: requests for a personalised product recommendation (what to buy or sell, whether a
  product is a good buy, when to trade), which an advisory service may not be licensed to give,
  except for the products the rule's `allow` names (the advisor refuses the others).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from serve_apps.normalize import normalize, skeleton
from serve_apps.pii import Redaction, redact
from serve_apps.policy_config import GuardrailRule
from training.errors import LLMOpsError

_VERBS = r"(?:ignore|disregard|forget|override|bypass|skip|drop|discard|abandon|neglect|" \
         r"set aside|throw out|stop following|do not follow|don't follow)"
_WHAT = r"(?:instructions?|rules|prompts?|directions|directives|guidelines|guardrails|" \
        r"constraints|restrictions|policies|programming)"
_BEFORE = r"(?:previous|prior|above|earlier|preceding|foregoing|all|any|your|these|those|" \
          r"system|original|initial|safety)"
_AFTER = r"(?:above|before|earlier|previously|so far|until now|you (?:were|have been) " \
         r"(?:given|told)|you received|given to you)"
INJECTION = {
    "ignore-instructions": rf"\b{_VERBS}\b[^.\n]{{0,40}}\b{_BEFORE}\b[^.\n]{{0,25}}\b{_WHAT}\b"
                           rf"|\b{_VERBS}\b[^.\n]{{0,30}}\b(?:{_WHAT}|everything|anything)\b[^.\n]{{0,20}}"
                           rf"\b{_AFTER}\b",
    "reveal-prompt": r"\b(?:reveal|show|print|repeat|leak|output|display|dump|tell me|give me|"
                     r"what (?:is|are|were))\b[^.\n]{0,30}\b(?:system|hidden|initial|original|"
                     r"secret|developer)\s+(?:prompt|instructions|message|rules)\b",
    "role-override": r"\byou are now\b|\bfrom now on,? you\b|\bpretend (?:to be|you are)\b|"
                     r"\bact as (?:an? )?(?:unfiltered|uncensored|unrestricted)\b|"
                     r"\bnew (?:system )?instructions\s*:",
    "jailbreak": r"\b(?:developer|jailbreak|god|dan)\s+mode\b|\bdo anything now\b",
    # the control tokens of common chat templates (ChatML, Llama 2/3, Mistral, Gemma, Phi, ...)
    "template-tokens": r"<\|[a-z_]{2,30}\|>|</?s>|\[/?(?:inst|system_prompt|avail_tools)\]|"
                       r"<</?sys>>|<(?:start|end)_of_turn>|<\|?(?:system|im_start|im_end|"
                       r"endoftext)\|?>|<(?:bos|eos|pad)>",
}
_TRADE = r"(?:buy|sell|invest|put|move|switch|dump|hold|get into|pick|choose|go with|pour)"
_PRODUCT = r"(?:funds?|etfs?|stocks?|shares?|bonds?|coins?|crypto(?:currenc(?:y|ies))?|" \
           r"tokens?|products?|securit(?:y|ies)|index funds?|assets?|investments?|tickers?|" \
           r"options?|reits?|annuit(?:y|ies)|pensions?|accounts?)"
ADVICE = {
    # "should I buy/sell ...", "would you put my savings into ...", "do you think I should ..."
    "what-to-trade": rf"\b(?:should|shall|must|do|would|can) (?:i|we)\b[^.?!\n]{{0,30}}"
                     rf"\b{_TRADE}\b|\bwould you\b[^.?!\n]{{0,20}}\b{_TRADE}\b",
    # "which fund should I ...", "what stock will go up", "the best ETF for retirement"
    "which-product": rf"\b(?:which|what)\b[^.?!\n]{{0,20}}\b{_PRODUCT}\b[^.?!\n]{{0,30}}"
                     rf"\b(?:should|to|would|will|do you|is best|are best|go up|rise)\b|"
                     rf"\b(?:best|top|safest|hottest)\b[^.?!\n]{{0,15}}\b{_PRODUCT}\b",
    "recommend": rf"\b(?:recommend|suggest|advise|tip)\w*\b[^.?!\n]{{0,30}}"
                 rf"\b(?:{_PRODUCT}|buy|sell|invest)\b",
    "good-buy": r"\b(?:a )?good (?:buy|investment|pick|bet|time to (?:buy|sell))\b|"
                r"\b(?:worth|time to|right \w+ to) (?:buying|selling|investing|buy|sell)\b|"
                r"\b(?:buy|sell) (?:now|before|after|today|next)\b",
}
# a phrase spelled out letter by letter (`i g n o r e  a l l ...`) joins into one run
_COMPACT = re.compile(r"(?:ignore|disregard|forget|override|bypass)[a-z]{0,20}(?:instructions?|"
                      r"rules|prompts?|guidelines)|(?:reveal|show|print)[a-z]{0,12}system"
                      r"(?:prompt|instructions)|developermode|doanythingnow")

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


def _disguise_scan(patterns: dict[str, str], placeholder: str) -> Callable[[str], Redaction]:
    """A pattern scan that also sees through disguised letters (`skeleton`): what it finds only
    in the disguised form cannot be cut out, so the whole text becomes the placeholder."""
    plain = _pattern_scan(patterns, placeholder)

    def scan(text: str) -> Redaction:
        result = plain(text)
        if result.found:
            return result
        disguised = skeleton(text)
        found = plain(disguised).found
        runs = sum(len(_COMPACT.findall(w)) for w in disguised.split() if len(w) > 12)
        if runs:
            found["spelled-out"] = runs
        return Redaction(placeholder, found) if found else result

    return scan


@functools.cache
def _bias_patterns() -> dict[str, str]:
    return {category: r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"
            for category, words in PROTECTED.items()}


def _advice_scan(allow: Sequence[str]) -> Callable[[str], Redaction]:
    """Recommendation requests, sentence by sentence, less those about an allowed product."""
    scan = _pattern_scan(ADVICE, "[ADVICE]")
    allowed = [re.compile(p, re.IGNORECASE) for p in allow]

    def advice(text: str) -> Redaction:
        parts, found = [], {}
        for sentence in re.split(r"(?<=[.?!\n])", text):
            result = scan(sentence)
            if result.found and not any(p.search(sentence) for p in allowed):
                sentence = result.text
                for label, n in result.found.items():
                    found[label] = found.get(label, 0) + n
            parts.append(sentence)
        return Redaction("".join(parts), found)

    return advice


def scanner(rule: GuardrailRule) -> Callable[[str], Redaction]:
    """The rule's scan: the text with its matches replaced, and what it found."""
    if rule.kind == "advice":
        return _advice_scan(rule.allow)
    if rule.kind == "pii":
        return redact
    if rule.kind == "injection":
        return _disguise_scan(INJECTION, "[REMOVED]")
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
        `block` rule catches. A None (no text, e.g. a blocked post) stays None. Rules read the
        normalised text (`serve_apps/normalize.py`); a text no `redact` rule changed goes on
        exactly as given, a redacted one in its normalised form."""
        out, findings = [], []
        for item, text in enumerate(texts):
            current, changed = (normalize(text), False) if text is not None else (None, False)
            for rule, scan in self.rules if text is not None else ():
                result = scan(current)
                if not result.found:
                    continue
                findings.append(Finding(rule.name, rule.kind, rule.action, self.where, item,
                                        result.found))
                if rule.action == "block":
                    raise Blocked(f"{self.where} text {item} was refused by guardrail "
                                  f"{rule.name!r} ({', '.join(sorted(result.found))})")
                if rule.action == "redact":
                    current, changed = result.text, True
            out.append(current if changed else text)
        return out, findings
