"""The canary's verdict (`cluster/canary.py`): the challenger against the champion over the
same period, on errors, latency, confidence and, with enough labels a side, feedback
accuracy."""

import pandas as pd

from cluster.canary import canary_verdict
from cluster.settings import CanaryPolicy


def _rows(side: str, n: int, *, error: float = 0.0, latency: float = 10.0, confidence: float = 0.9,
          right: float = 0.9, labelled: int = 0) -> pd.DataFrame:
    """`n` log rows of one side; of the first `labelled`, a share `right` labelled as predicted."""
    k_err, k_right = round(n * error), round(labelled * right)
    return pd.DataFrame({
        "variant": side, "outcome": ["ok"] * (n - k_err) + ["error"] * k_err,
        "latency_ms": latency, "confidence": confidence, "prediction": "a",
        "label": ["a"] * k_right + ["b"] * (labelled - k_right) + [None] * (n - labelled)})


def test_canary_verdict_compares_the_challenger_with_the_champion_over_the_same_period():
    policy = CanaryPolicy(min_requests=100)
    champion = _rows("champion", 400, labelled=40)
    verdict, reason, stats = canary_verdict(pd.concat([champion, _rows("challenger", 99)]), policy)
    assert verdict is None and "99 of 100" in reason
    same = pd.concat([champion, _rows("challenger", 100, labelled=40)])
    assert canary_verdict(same, policy)[0] is True
    for challenger, why in [(_rows("challenger", 100, error=0.05), "error rate"),
                            (_rows("challenger", 100, latency=16.0), "p50 latency"),
                            (_rows("challenger", 100, confidence=0.8), "confidence"),
                            (_rows("challenger", 100, right=0.7, labelled=40), "feedback accuracy")]:
        verdict, reason, _ = canary_verdict(pd.concat([champion, challenger]), policy)
        assert verdict is False and why in reason, reason
    # a shadowing challenger's answers are judged the same way
    shadow = _rows("challenger", 100, right=0.7, labelled=40).assign(variant="shadow")
    verdict, reason, stats = canary_verdict(pd.concat([champion, shadow]), policy)
    assert verdict is False and "feedback accuracy" in reason
    assert stats["challenger"]["requests"] == 100
    # a drop past the allowance but within chance at 40 labels a side is no evidence
    close = canary_verdict(pd.concat([champion, _rows("challenger", 100, right=0.85,
                                                      labelled=40)]), policy)
    assert close[0] is True and close[2]["challenger"]["accuracy"] < 0.9 - policy.max_accuracy_drop
    # 20 labels are too few to judge accuracy by
    few = canary_verdict(pd.concat([champion, _rows("challenger", 100, right=0.7, labelled=20)]),
                         policy)
    assert few[0] is True and few[2]["challenger"]["labelled"] == 20


def _generated(side: str, n: int, corrected: int, kept: int) -> pd.DataFrame:
    """`n` generator answers of one side; the first `corrected` got a correction, which left
    the first `kept` of them as they were (the rest rewritten in other words)."""
    answer, other = "I disagree with you about gardening.", "Please stop posting here, thanks."
    return pd.DataFrame({
        "variant": side, "outcome": "ok", "latency_ms": 10.0, "confidence": 0.6,
        "prediction": "stop", "label": None, "output": answer,
        "correction": [answer] * kept + [other] * (corrected - kept) + [None] * (n - corrected)})


def test_a_generators_canary_is_judged_by_its_answers_words_against_their_corrections():
    policy = CanaryPolicy(min_requests=100)
    champion = _generated("champion", 300, 40, 36)
    same = canary_verdict(pd.concat([champion, _generated("challenger", 100, 40, 35)]), policy)
    assert same[0] is True and same[2]["challenger"]["labelled"] == 40
    assert same[2]["champion"]["accuracy"] == 0.9  # token F1: 1 kept as is, 0 rewritten whole
    verdict, reason, stats = canary_verdict(
        pd.concat([champion, _generated("challenger", 100, 40, 24)]), policy)
    assert verdict is False and "feedback accuracy 0.600 vs 0.900" in reason, reason
    # a correction that keeps half the answer's words scores between the two
    half = champion.assign(correction=champion.correction.where(
        champion.correction.isna(), "I disagree with you, sorry."))
    assert 0.3 < canary_verdict(pd.concat([half, _generated("challenger", 100, 0, 0)]),
                                policy)[2]["champion"]["accuracy"] < 0.9
