"""The canary's verdict: the challenger against the champion over the same period of served
traffic, by the policy's rules (`controller.canary`). Pure: the controller reads the log and
acts on the verdict."""

from __future__ import annotations

import math

import pandas as pd

from cluster.settings import CanaryPolicy
from monitoring.feedback import MIN_LABELS, feedback_scores
from monitoring.log import SHADOW


def canary_verdict(rows: pd.DataFrame, policy: CanaryPolicy) -> tuple[bool | None, str, dict]:
    """Champion against challenger over the same period (log rows with `variant`, `outcome`,
    `latency_ms`, `confidence` and maybe feedback: `label`, or a generator's `correction` of its
    `output`): None while the challenger has answered fewer
    than `min_requests`, else whether it may be promoted and why. Feedback accuracy fails it
    only past the allowance and two standard errors of chance. A shadowing challenger's
    answers count as the challenger's (its latency is the request's, so only the other
    criteria tell the two apart)."""
    rows = rows.assign(variant=rows.variant.replace(SHADOW, "challenger"))
    stats = {}
    for side in ("champion", "challenger"):
        part = rows[rows.variant == side]
        ok = part[part.outcome == "ok"]
        scores = feedback_scores(ok)
        stats[side] = {
            "requests": len(part),
            "error_rate": float((part.outcome != "ok").mean()) if len(part) else 0.0,
            "latency_p50_ms": float(ok.latency_ms.median()) if len(ok) else 0.0,
            "confidence": float(ok.confidence.mean()) if len(ok) else 0.0,
            "labelled": len(scores),
            "accuracy": float(scores.mean()) if len(scores) else None,
            "accuracy_variance": float(scores.var()) if len(scores) else None}
    ch, cc = stats["champion"], stats["challenger"]
    if cc["requests"] < policy.min_requests or ch["requests"] == 0:
        return None, f"challenger answered {cc['requests']} of {policy.min_requests}", stats
    failures = []
    if cc["error_rate"] > ch["error_rate"] + policy.max_error_rate_increase:
        failures.append(f"error rate {cc['error_rate']:.3f} vs {ch['error_rate']:.3f}")
    if cc["latency_p50_ms"] > ch["latency_p50_ms"] * policy.max_latency_ratio:
        failures.append(f"p50 latency {cc['latency_p50_ms']:.0f} ms vs {ch['latency_p50_ms']:.0f}")
    if cc["confidence"] < ch["confidence"] - policy.max_confidence_drop:
        failures.append(f"confidence {cc['confidence']:.3f} vs {ch['confidence']:.3f}")
    if min(cc["labelled"], ch["labelled"]) >= MIN_LABELS and \
            ch["accuracy"] - cc["accuracy"] > max(policy.max_accuracy_drop, 2 * _chance(ch, cc)):
        failures.append(f"feedback accuracy {cc['accuracy']:.3f} vs {ch['accuracy']:.3f}")
    if failures:
        return False, "worse than the champion: " + "; ".join(failures), stats
    return True, (f"no worse than the champion over {cc['requests']} requests (error rate "
                  f"{cc['error_rate']:.3f}, p50 {cc['latency_p50_ms']:.0f} ms, confidence "
                  f"{cc['confidence']:.3f})"), stats



def _chance(a: dict, b: dict) -> float:
    """The standard error of the difference of two sides' feedback accuracies: a drop within
    two of them is what 30-odd labels a side show by chance."""
    return math.sqrt(sum(s["accuracy_variance"] / s["labelled"] for s in (a, b)))
