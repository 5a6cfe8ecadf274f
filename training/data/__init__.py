"""Seeded generator of labelled traffic with named drift scenarios.

`generate("support-tickets", "new-product", n=500, seed=1, fraction=0.3)` returns a DataFrame in
which about 30% of the rows come from the scenario and the rest from `base`.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pandas as pd

from training.data import advisor, moderation, support
from training.data.lexicon import SCENARIOS, Lexicon, MessageSampler, Scenario
from training.errors import InvalidData, LLMOpsError, UnknownName

__all__ = ["DATASETS", "SCENARIOS", "Scenario", "generate", "handwritten", "labels_of",
           "reorganise", "summarize", "true_labels", "write"]

DATASETS: dict[str, Lexicon] = {"support-tickets": support.LEXICON, "moderation": moderation.LEXICON,
                                "advisor-questions": advisor.LEXICON}
# `rewrite` is the target text of generators: the safe rewrite of a toxic post (moderation), the
# agent's reply to a ticket (support-tickets); empty where there is none.
COLUMNS = ["id", "text", "label", "intent", "scenario", "rewrite"]


def _lexicon(dataset: str) -> Lexicon:
    if dataset not in DATASETS:
        raise UnknownName("dataset", dataset, list(DATASETS))
    return DATASETS[dataset]


def reorganise(dataset: str, moves: dict[str, str]) -> None:
    """`dataset`'s concept shift moves its intents by `moves` (intent -> label) instead of its
    lexicon's reorganisation, in this process: the loop measured on a shift its thresholds were
    not chosen on (`bench/loop.py --moves`)."""
    lexicon = _lexicon(dataset)
    label = {i.name: i.label for i in lexicon.intents}
    if not moves:
        raise InvalidData("a reorganisation moves one intent at least")
    for intent, to in moves.items():
        if intent not in label:
            raise UnknownName("intent", intent, list(label))
        if to not in lexicon.labels:
            raise UnknownName("label", to, lexicon.labels)
        if to == label[intent]:
            raise InvalidData(f"intent {intent!r} is already labelled {to!r}")
    DATASETS[dataset] = dataclasses.replace(lexicon, concept_relabel=dict(moves))


def labels_of(dataset: str) -> list[str]:
    """The label set of a dataset, in a stable order."""
    return list(_lexicon(dataset).labels)


def generate(dataset: str, scenario: str = "base", n: int = 1000, seed: int = 0,
             fraction: float = 1.0, priors: dict[str, float] | None = None) -> pd.DataFrame:
    """`n` rows, deterministic for (dataset, scenario, n, seed, fraction, priors).

    `fraction` of the rows (in expectation) come from `scenario`, the rest from `base`;
    `priors` overrides the label mix (for example `{"toxic": 1}` for rewrite pairs).
    """
    lexicon = _lexicon(dataset)
    if scenario not in SCENARIOS:
        raise UnknownName("scenario", scenario, list(SCENARIOS))
    if n < 1:
        raise InvalidData(f"n must be at least 1, got {n}")
    if not 0.0 <= fraction <= 1.0:
        raise InvalidData(f"fraction must be within [0, 1], got {fraction}")
    if priors is not None and (unknown := set(priors) - set(lexicon.labels)):
        raise UnknownName("label", sorted(unknown)[0], lexicon.labels)
    rng = random.Random(f"{dataset}/{scenario}/{seed}/{fraction}")
    samplers = {name: MessageSampler(lexicon, SCENARIOS[name], priors)
                for name in {"base", scenario}}
    rows = []
    for i in range(n):
        name = scenario if rng.random() < fraction else "base"
        row = samplers[name].sample(rng)
        rows.append({"id": f"{dataset}-{scenario}-{seed}-{i}", "scenario": name, **row})
    return pd.DataFrame(rows, columns=COLUMNS)


def true_labels(dataset: str, df: pd.DataFrame) -> pd.Series:
    """Each generated row's right answer: its intent's label, moved where its scenario relabels
    it, without the annotators' random mistakes (`Lexicon.label_noise`) that its `label`
    carries. No model can learn those mistakes, so a benchmark scores against this."""
    lexicon = _lexicon(dataset)
    label = {i.name: i.label for i in lexicon.intents}
    return pd.Series([lexicon.concept_relabel.get(intent, label[intent])
                      if SCENARIOS[scenario].relabel else label[intent]
                      for intent, scenario in zip(df.intent, df.scenario)],
                     index=df.index, name="label")


HANDWRITTEN = Path(__file__).with_name("handwritten")


def handwritten(dataset: str, scenario: str = "base") -> pd.DataFrame:
    """Texts a person wrote for each intent of `dataset` (`handwritten/<dataset>.csv`: five per
    intent of the base scenario, in other words than the generator's templates, some terse or
    misspelt), labelled as `scenario` labels them: what the generated data cannot show, how
    far its phrasings carry over to people's."""
    path = HANDWRITTEN / f"{dataset}.csv"
    if not path.exists():
        raise UnknownName("hand-written dataset", dataset,
                          sorted(p.stem for p in HANDWRITTEN.glob("*.csv")))
    if scenario not in SCENARIOS:
        raise UnknownName("scenario", scenario, list(SCENARIOS))
    df = pd.read_csv(path).assign(scenario=scenario)
    return df.assign(label=true_labels(dataset, df))


def write(df: pd.DataFrame, path: str | Path) -> Path:
    """Write Parquet, or JSON lines when the path ends in `.jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise LLMOpsError(f"output must end in .parquet or .jsonl, got {path.name!r}")
    return path


def summarize(df: pd.DataFrame) -> str:
    """One line: row count and label mix."""
    mix = df["label"].value_counts(normalize=True).sort_index()
    return f"{len(df)} rows; " + ", ".join(f"{k} {v:.0%}" for k, v in mix.items())
