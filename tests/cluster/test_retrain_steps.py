"""When a retrain on drift waits for labels (`cluster/retrain.py`): a move the contradiction
check suspects and the champion's confident mistakes say too; a move found on single labels;
and, once a concept shift is found, a pair the confident mistakes keep saying that no move
found explains."""

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
