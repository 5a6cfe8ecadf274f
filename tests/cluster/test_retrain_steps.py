"""When a retrain on drift waits for labels (`cluster/retrain.py`): a move the contradiction
check suspects and the champion's confident mistakes say too; a move found on single labels;
once a concept shift is found, a pair the confident mistakes keep saying that no move found
explains; and a concept shift found on fewer labels than `controller.concept_shift_labels`."""

from types import SimpleNamespace

import pandas as pd

from cluster.retrain import RetrainSteps
from cluster.settings import load_settings


def _labelled(pairs: dict[tuple[str, str], int]) -> pd.DataFrame:
    """Labelled answers at 0.97 confidence: `n` answered A and labelled B per (A, B)."""
    rows = [(a, b) for (a, b), n in pairs.items() for _ in range(n)]
    return pd.DataFrame({"prediction": [a for a, _ in rows], "label": [b for _, b in rows],
                         "confidence": 0.97})


def test_a_found_concept_shift_waits_for_the_moves_its_confident_mistakes_still_say():
    steps = RetrainSteps(SimpleNamespace(settings=load_settings(environ={})))
    right = {(label, label): 20 for label in ("billing", "refund", "technical")}
    recent = _labelled({**right, ("account", "security"): 20, ("refund", "billing"): 3})
    found = {"contradictions": {"moved": {"account -> security": 50}}}
    assert steps._unseen_moves(recent, found) == {"refund -> billing": "3 confident mistakes"}
    # no move found (new inputs answered with confidence, say): nothing holds the retrain
    assert steps._unseen_moves(recent, {}) == {}
    # two mistakes of a pair: label noise can say as much
    fewer = _labelled({**right, ("account", "security"): 20, ("refund", "billing"): 2})
    assert steps._unseen_moves(fewer, found) == {}
    # suspected by the contradiction check and said by two confident mistakes: it waits too
    suspected = {**found, "suspected_moves": {"refund -> billing": 2}}
    assert steps._unseen_moves(fewer, suspected) == {"refund -> billing": "2 labelled rows"}


def test_a_concept_shift_found_on_its_first_labels_waits_for_more():
    steps = RetrainSteps(SimpleNamespace(settings=load_settings(environ={})))
    need = steps.c.settings.controller.concept_shift_labels
    recent = _labelled({(label, label): 20 for label in ("billing", "refund", "technical")})
    found = {"concept_shift": "refund -> billing (40 replay rows relabelled)",
             "contradictions": {"moved": {"refund -> billing": 40}}}
    assert steps._waiting(recent, {**found, "labelled": need - 1}) == (
        f"a concept shift (refund -> billing) found on {need - 1} labels since the drift; its "
        f"retrain waits for {need}")
    assert steps._waiting(recent, {**found, "labelled": need}) is None
    assert steps._waiting(recent, {"labelled": 10}) is None  # no concept shift: new inputs
