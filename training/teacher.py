"""A second opinion on a concept-shift retrain's relabelled replay.

`training/contradiction.py` relabels the replay rows of a moved label by their neighbours in
the bundled encoder's space, which knows meaning, not the task's boundaries: two intents under
one old label that the shift split (a refund request, now billing, beside a return label, still
refund) sit close there. The teacher is the champion fine-tuned on the labelled recent rows
alone, in this process and in seconds: it has learnt the new concept from labels that separate
them. It decides each replay row of a moved label between that label and where it moved, when
it is at least `SURE` of its choice, and only between labels it has learnt: `MIN_ROWS` labelled
rows of each (the label queue asks where the champion is wrong, so a label that did not move
may have almost none, and a teacher without them moves its whole region); and only where it
answers the labels: the rows a labelled row speaks for keep the encoder's relabelling, which
counted that label, where the teacher answers it otherwise (`_unanswered`). Elsewhere the
encoder's relabelling stands (measured by `bench/relabel.py`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pandas as pd

from training.config import TrainingConfig
from training.errors import InvalidData

SURE, EPOCHS, MIN_ROWS = 0.8, 4, 10

# texts -> (labels, probabilities per text and label)
Judge = Callable[[list[str]], tuple[list[str], np.ndarray]]


def fit(training: TrainingConfig, registry, task: str, source: str,
        learn: pd.DataFrame) -> Judge | None:
    """The model at `source` (a registered version, `models:/NAME/VERSION`) fine-tuned on
    `learn` alone, `EPOCHS` epochs of its task's settings; None when the rows cannot train it
    (a label without a row: `validate_data`)."""
    from training.job import make_spec
    from training.models import classify
    from training.registry import download_hf_model
    from training.taskdata import TaskData
    from training.worker import fit_in_process

    config = training.starting_from(task, str(download_hf_model(source)), epochs=EPOCHS)
    rows = learn[["text", "label"]].reset_index(drop=True)
    try:
        spec = make_spec(config, registry, task, TaskData(
            train=pd.concat([rows] * training.retrain.recent_repeats, ignore_index=True),
            validation=rows.iloc[:16], holdouts={}, scenario="retrain"))
    except InvalidData:
        return None
    model = fit_in_process(spec)
    return lambda texts: (spec.labels, classify(model, spec.tokenizer, texts,
                                                spec.model.max_length).probs)


def decidable(moves: list[tuple[str, str]], learnt: list[str]) -> list[tuple[str, str]]:
    """The moves whose two labels the teacher learns from `MIN_ROWS` rows each (`learnt`: the
    labels of its training rows)."""
    rows = Counter(learnt)
    return [(a, b) for a, b in moves if min(rows[a], rows[b]) >= MIN_ROWS]


def refine(texts: list[str], before: list[str], relabelled: list[str],
           moves: list[tuple[str, str]], judge: Judge, learnt: list[str],
           labelled: pd.DataFrame) -> tuple[list[str], int]:
    """The labels of replay rows (`before`: as the champion learnt them; `relabelled`: after
    the encoder's relabelling by `labelled`, the recent rows with their labels) with the
    teacher's sure choices between a moved label and where it moved, for the moves whose two
    labels it learnt from `MIN_ROWS` rows each (`learnt`: the labels of its training rows),
    where it answers the labels (`_unanswered`); and how many rows it changed."""
    moves = decidable(moves, learnt)
    choices = {a: [a] + [b for src, b in moves if src == a] for a, _ in moves}
    asked = [x for x, a in enumerate(before) if a in choices]
    out = list(relabelled)
    if asked:
        unanswered = _unanswered(texts, labelled, judge)
        asked = [x for x in asked if not unanswered[x]]
    if not asked:
        return out, 0
    labels, probs = judge([texts[x] for x in asked])
    for x, p in zip(asked, probs):
        options = {lbl: p[labels.index(lbl)] for lbl in choices[before[x]]}
        best = max(options, key=options.get)
        if options[best] >= SURE * sum(options.values()):
            out[x] = best
    return out, sum(a != b for a, b in zip(out, relabelled))


def _unanswered(texts: list[str], labelled: pd.DataFrame, judge: Judge) -> np.ndarray:
    """Per text, whether a labelled row that speaks for it (its `K` nearest in the encoder's
    space, `contradiction.nearest_rows`) is one the teacher answers otherwise: a label it did
    not learn (noise, or too few of its kind) or one that came after it was fitted. The loop
    fits it while labels keep arriving, and a moved phrasing's first labels may come in the
    last batch: a teacher fitted before them kept a whole phrasing at its old label (12 rows,
    0.977 of clean in a loop run)."""
    from training.contradiction import embed, nearest_rows

    labels, probs = judge(list(labelled.text))
    missed = labelled[np.array(labels)[probs.argmax(axis=1)] != labelled.label.astype(str)]
    out = np.zeros(len(texts), dtype=bool)
    if len(missed):
        for near in nearest_rows(embed(list(missed.text)) @ embed(texts).T):
            out[near] = True
    return out
