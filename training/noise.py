"""Annotators' mistakes among a retrain's labels (`Lexicon.label_noise`: about 3% of feedback).

A retrain learns each new phrasing from a handful of labels, each repeated (`copies`), so one
wrong label that is the only one learnt for its phrasing teaches it: a new-product retrain
learnt "The Halo trial bundle goes back within the 30 night window" as `billing` from one
mistaken label (its three right ones held out or in validation) and answered 90 of its 397
tickets wrong. Wilson's editing (edited nearest neighbours, 1972) drops such a row from the rows
learnt from: at least `MIN_VOTES` of the labelled rows near it (within cosine `SIMILARITY` in
the bundled encoder's space, its own phrasing: 0.1-0.9% of such pairs differ in their right
label in the scenarios' traffic) carry one other label and outnumber those that carry its own.
All the labels since the drift's onset vote, the held-out ones too (they judge the challenger,
never train it); only rows learnt from are dropped. A concept shift moves whole phrasings, whose
labels then agree with each other, so it is left to `training/contradiction.py`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from training.contradiction import embed

SIMILARITY, MIN_VOTES = 0.8, 2


def label_mistakes(learn: pd.DataFrame, voters: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
    """Per row of `learn` (`text`, `label`), whether its label is a mistake by its neighbours
    among `learn` and `voters`, and the mistakes as "label -> its neighbours' label": rows."""
    if learn.empty:
        return np.zeros(0, bool), {}
    rows = pd.concat([learn[["text", "label"]], voters[["text", "label"]]])
    e = embed(list(rows.text))
    names, codes = np.unique(rows.label.astype(str).to_numpy(), return_inverse=True)
    n, own = len(learn), codes[:len(learn)]
    near = e[:n] @ e.T >= SIMILARITY
    near[np.arange(n), np.arange(n)] = False  # a row does not vote on itself
    votes = near.astype(int) @ np.eye(len(names), dtype=int)[codes]  # learn rows x labels
    agree = votes[np.arange(n), own]
    votes[np.arange(n), own] = 0
    said = votes.argmax(axis=1)
    mistaken = (votes.max(axis=1) >= MIN_VOTES) & (votes.max(axis=1) > agree)
    return mistaken, dict(Counter(f"{names[a]} -> {names[b]}"
                                  for a, b in zip(own[mistaken], said[mistaken])))
