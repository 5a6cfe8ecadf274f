"""The generator engine: a lexicon of intents and slots, drift scenarios, and the noise that
keeps a dataset from being trivially separable."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

NEW_PRODUCT = "new-product"


@dataclass(frozen=True)
class Intent:
    """One reason to write a message: phrasings sharing a label (and, for toxic ones, one safe
    rewrite per phrasing)."""

    name: str
    label: str
    templates: list[str]
    rewrites: list[str] | None = None
    lexicon: str = "base"


@dataclass(frozen=True)
class Lexicon:
    """Everything a dataset is made of; scenarios reuse it with other priors, intents or labels."""

    name: str
    labels: list[str]
    priors: dict[str, float]
    intents: list[Intent]
    slots: dict[str, list[str]]
    openers: list[str]
    closers: list[str]
    shifted_priors: dict[str, float]
    concept_relabel: dict[str, str]
    typo_rate: float = 0.03
    label_noise: float = 0.03
    ambiguity: float = 0.12
    replies: dict[str, str] = field(default_factory=dict)  # intent -> how an agent resolved it


@dataclass(frozen=True)
class Scenario:
    """A named distribution of traffic, described by how it departs from `base`."""

    name: str
    description: str
    intents: str = "base"
    shifted_priors: bool = False
    relabel: bool = False
    style: Callable[[str, random.Random], str] | None = field(default=None)


_SLANG = {
    "please": "pls", "you": "u", "your": "ur", "you're": "ur", "thanks": "thx", "thank you": "ty",
    "because": "cuz", "really": "rly", "are": "r", "to be honest": "tbh", "right now": "rn",
    "as soon as possible": "asap", "what": "wut", "i don't know": "idk", "before": "b4",
    "people": "ppl", "message": "msg", "tomorrow": "tmrw", "with": "w/", "without": "w/o",
}
_SLANG_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(_SLANG, key=len, reverse=True))
                       + r")\b")
_EMOJI = ["😡", "🙏", "😭", "🔥", "💀", "👀", "😤", "🤡", "😩", "✨"]
_FILLERS = ["ngl", "lowkey", "fr", "bruh", "yo", "smh", "istg"]


def slangify(text: str, rng: random.Random) -> str:
    """Style shift: lower case, texting abbreviations, fillers and emoji."""
    text = _SLANG_RE.sub(lambda m: _SLANG[m.group(1)], text.lower())
    text = text.rstrip(".!?")
    if rng.random() < 0.5:
        text = f"{rng.choice(_FILLERS)} {text}"
    if rng.random() < 0.4:
        text = f"{text} {rng.choice(_FILLERS)}"
    return text + " " + "".join(rng.choices(_EMOJI, k=rng.randint(1, 3)))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("base", "The training distribution."),
    Scenario(NEW_PRODUCT, "Covariate shift: a product launch brings vocabulary never seen in "
             "training.", intents=NEW_PRODUCT),
    Scenario("label-shift", "Prior shift: the mix of labels changes sharply; each label's "
             "messages look as before.", shifted_priors=True),
    Scenario("concept-shift", "Concept shift: a reorganisation routes the same phrasings to "
             "other labels.", relabel=True),
    Scenario("slang", "Style shift: slang, abbreviations and emoji.", style=slangify),
]}


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values)


def _slot_values(templates: list[str], slots: dict[str, list[str]], rng: random.Random) -> dict:
    names = {f for t in templates for _, f, _, _ in string.Formatter().parse(t) if f}
    return {n: rng.choice(slots[n]) for n in sorted(names)}


def _typos(text: str, rate: float, rng: random.Random) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and rng.random() < rate:
            j = rng.randrange(len(w) - 1)
            kind = rng.randrange(3)
            if kind == 0:
                w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            elif kind == 1:
                w = w[:j] + w[j + 1:]
            else:
                w = w[:j] + w[j] + w[j:]
            words[i] = w
    return " ".join(words)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


class MessageSampler:
    """Draws labelled messages of one lexicon under one scenario."""

    def __init__(self, lexicon: Lexicon, scenario: Scenario, priors: dict[str, float] | None = None):
        self.lexicon = lexicon
        self.scenario = scenario
        pool = [i for i in lexicon.intents if i.lexicon == scenario.intents]
        self.by_label = {lbl: [i for i in pool if i.label == lbl] for lbl in lexicon.labels}
        base = lexicon.shifted_priors if scenario.shifted_priors else lexicon.priors
        weights = priors if priors is not None else base
        self.labels = [lbl for lbl in lexicon.labels if self.by_label[lbl] and weights.get(lbl, 0)]
        self.weights = [weights[lbl] for lbl in self.labels]
        self.base_pool = [i for i in lexicon.intents if i.lexicon == "base"]

    def sample(self, rng: random.Random) -> dict[str, str]:
        lex = self.lexicon
        label = rng.choices(self.labels, self.weights)[0]
        intent = rng.choice(self.by_label[label])
        k = rng.randrange(len(intent.templates))
        templates = [intent.templates[k]] + ([intent.rewrites[k]] if intent.rewrites else [])
        values = _slot_values(templates, lex.slots, rng)
        core = _capitalize(_fill(intent.templates[k], values))
        rewrite = (_capitalize(_fill(intent.rewrites[k], values)) if intent.rewrites
                   else lex.replies.get(intent.name, ""))
        parts = [rng.choice(lex.openers), core]
        if rng.random() < lex.ambiguity:
            other = rng.choice([i for i in self.base_pool if i.label != intent.label])
            t = rng.choice(other.templates)
            extra = _fill(t, _slot_values([t], lex.slots, rng))
            parts.append("Also, " + (extra if extra.startswith("I ") else extra[:1].lower() + extra[1:]))
        parts.append(rng.choice(lex.closers))
        text = _typos(" ".join(p for p in parts if p), lex.typo_rate, rng)
        if self.scenario.style is not None:
            text = self.scenario.style(text, rng)
        if self.scenario.relabel:
            label = lex.concept_relabel.get(intent.name, label)
        if rng.random() < lex.label_noise:
            label = rng.choice(lex.labels)
        return {"text": text, "label": label, "intent": intent.name, "rewrite": rewrite}
