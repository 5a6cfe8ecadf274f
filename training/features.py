"""Drift features of texts, computed one way for the reference profile stored with a model
version at registration and for every request the model serves: text descriptors, the model's
prediction and confidence, and a fixed projection of its sentence embedding. Raw text is not
kept: the log and the profile hold only these numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch is imported by what runs models, not by readers of the log
    from training.models import Classified

DESCRIPTORS = ["chars", "words", "mean_word_length", "tokens_per_word", "non_letter_share",
               "upper_share", "digit_share"]
EMBEDDING_DIMS = 32
# the reference profile's column marking the rows of traffic the version serves (no true label:
# its retrain's drifted traffic, or traffic the loop adopted): live inputs are compared with
# those where it has any
SERVED = "served"


def descriptors(text: str, tokens: int) -> dict[str, float]:
    """Cheap statistics that move when the wording of traffic moves: new vocabulary splits into
    more tokens per word, slang shortens words, pasted codes add digits."""
    words = text.split()
    n, letters = max(len(text), 1), sum(c.isalpha() for c in text)
    return {"chars": float(len(text)), "words": float(len(words)),
            "mean_word_length": float(np.mean([len(w) for w in words])) if words else 0.0,
            "tokens_per_word": tokens / max(len(words), 1),
            "non_letter_share": 1 - letters / n,
            "upper_share": sum(c.isupper() for c in text) / n,
            "digit_share": sum(c.isdigit() for c in text) / n}


def input_features(texts: Sequence[str], out: Classified) -> list[dict]:
    """One row per text: its descriptors and projected embedding (the model's answer is
    beside them in `out`)."""
    return [{**descriptors(text, int(out.tokens[i])),
             "embedding": out.embeddings[i].astype(np.float32).tolist()}
            for i, text in enumerate(texts)]


def reference_profile(model, tokenizer, df: pd.DataFrame, labels: Sequence[str], max_length: int,
                      rows: int = 2000, seed: int = 0, temperature: float = 1.0,
                      served: bool = False) -> pd.DataFrame:
    """The features of (up to `rows` of) texts the model was not fit on, with their true labels
    where `df` has them: what live traffic is compared with (`monitoring/drift.py`); `served`:
    the texts are traffic the version serves, unlabelled (column `SERVED`). (On the very rows
    it was fit on a model is overconfident, which would read as drift on clean traffic.)"""
    from training.models import classify

    sample = df.sample(n=min(rows, len(df)), random_state=seed) if len(df) > rows else df
    out = classify(model, tokenizer, list(sample.text), max_length, embedding_dims=EMBEDDING_DIMS,
                   temperature=temperature)  # the confidence serving reports
    profile = pd.DataFrame(input_features(list(sample.text), out))
    profile["prediction"] = [labels[int(i)] for i in out.probs.argmax(axis=1)]
    profile["confidence"] = out.probs.max(axis=1).astype(float)
    profile["posterior"] = [p.astype(np.float32).tolist() for p in out.probs]
    profile["label"] = list(sample.label) if "label" in sample else None
    profile[SERVED] = served
    return profile


def generation_profile(task_model, df: pd.DataFrame, rows: int = 500, seed: int = 0
                       ) -> pd.DataFrame:
    """A generator's reference profile: the descriptors of (up to `rows` of) held-out prompts,
    counted in the tokens it reads (as serving counts them), and its answers to them beside
    their reference texts (`output`, `correction`: what a reviewer's correction is compared
    with). No class, confidence or embedding: a generator's live drift is its prompts' wording
    and its corrected answers' words (`monitoring/drift.py`)."""
    from training.models import prompt_of

    sample = df.sample(n=min(rows, len(df)), random_state=seed) if len(df) > rows else df
    tokenizer = task_model.tokenizer
    tokens = [len(tokenizer(prompt_of(tokenizer, t), add_special_tokens=False)["input_ids"])
              for t in sample.text]
    profile = pd.DataFrame([descriptors(t, n) for t, n in zip(sample.text, tokens)])
    nothing = [None] * len(profile)
    return profile.assign(embedding=nothing, prediction=nothing, confidence=np.nan,
                          posterior=nothing, label=nothing,
                          output=list(task_model.predict(None, sample[["text"]]).text),
                          correction=list(sample.rewrite), **{SERVED: False})

