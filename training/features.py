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


def prompt_tokens(tokenizer, text: str) -> int:
    """Tokens of the prompt a generator reads for `text` (`prompt_of`): what its descriptors
    count, at registration and in serving alike."""
    from training.prompts import prompt_of

    return len(tokenizer(prompt_of(tokenizer, text), add_special_tokens=False)["input_ids"])


def prompt_embeddings(model, tokenizer, texts: Sequence, max_length: int | None = None,
                      batch_size: int = 32, **forward) -> np.ndarray:
    """A generator's own view of its prompts, for drift checks: its last hidden state,
    mean-pooled over each prompt as it reads it (`prompt_of`; a conversation's newest user
    message alone, as the registration's prompts were read), projected to `EMBEDDING_DIMS`
    numbers as a classifier's sentence embedding is (`training.models.projection`). Positions
    follow the attention mask, so a prompt's embedding does not depend on its batch's padding.
    A prompt is cut at `max_length` tokens (None: the positions the model has). `forward`:
    more arguments of the model's forward (a PEFT model's `adapter_names`)."""
    import torch

    from training.prompts import Chat, prompt_of

    out = []
    device = next(model.parameters()).device
    max_length = embedded_tokens(model.config, max_length)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer([prompt_of(tokenizer, t.last_user if isinstance(t, Chat) else t)
                             for t in texts[i:i + batch_size]],
                            truncation=True, max_length=max_length, padding=True,
                            add_special_tokens=False, return_tensors="pt").to(device)
            mask = enc["attention_mask"]
            hidden = model(**enc, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           output_hidden_states=True, **{k: v[i:i + batch_size] for k, v in
                                                         forward.items()}).hidden_states[-1]
            weights = mask.unsqueeze(-1).float()
            out.append(projected((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)))
    return np.concatenate(out) if out else np.zeros((0, EMBEDDING_DIMS), np.float32)


def embedded_tokens(config, max_length: int | None) -> int:
    """How much of a prompt `prompt_embeddings` reads: its first `max_length` tokens (None: the
    positions the model has)."""
    return max_length or getattr(config, "max_position_embeddings", None) \
        or getattr(config, "n_positions", 512)


def projected(pooled) -> np.ndarray:
    """Mean-pooled last hidden states (rows) as `prompt_embeddings` gives them: projected to
    `EMBEDDING_DIMS` numbers (a generator's continuous batch pools its prefills with this)."""
    from training.models import projection

    return (pooled @ projection(pooled.shape[-1], EMBEDDING_DIMS).to(pooled.device)).cpu().numpy()


def generation_profile(task_model, df: pd.DataFrame, rows: int = 500, seed: int = 0
                       ) -> pd.DataFrame:
    """A generator's reference profile: the descriptors of (up to `rows` of) held-out prompts,
    counted in the tokens it reads (as serving counts them), their `prompt_embeddings`, and its
    answers to them beside their reference texts (`output`, `correction`: what a reviewer's
    correction is compared with). No class or confidence: a generator's live drift is its
    prompts' wording and meaning and its corrected answers' words (`monitoring/drift.py`)."""
    sample = df.sample(n=min(rows, len(df)), random_state=seed) if len(df) > rows else df
    tokenizer, texts = task_model.tokenizer, list(sample.text)
    profile = pd.DataFrame([descriptors(t, prompt_tokens(tokenizer, t)) for t in texts])
    nothing = [None] * len(profile)
    embedded = prompt_embeddings(task_model.model, tokenizer, texts, task_model.meta["max_length"])
    return profile.assign(embedding=[e.astype(np.float32).tolist() for e in embedded],
                          prediction=nothing, confidence=np.nan, posterior=nothing, label=nothing,
                          output=list(task_model.predict(None, sample[["text"]]).text),
                          correction=list(sample.rewrite), **{SERVED: False})

