"""Prometheus metrics of the serving path, recorded inside the replicas through
`ray.serve.metrics`: Ray exports them on each node's metrics export port (8080 on the local
head) with a `ray_` prefix, and Serve adds `application`, `deployment` and `replica` tags.

    ray_llmops_requests_total{model, model_version, outcome}     answered texts, by deciding model
    ray_llmops_request_latency_seconds{model}                     request latency at the ingress
    ray_llmops_guardrail_actions_total{action}                    moderation: allow/redact/rewrite/block/hold
    ray_llmops_abstentions_total{model, model_version}            answers whose prediction set was not 1 label
    ray_llmops_errors_total{status}                               problem responses, by HTTP status
    ray_llmops_batch_size{model, model_version}                   texts per forward pass
    ray_llmops_model_batch_seconds{model, model_version}          time of one forward pass
    ray_llmops_model_info{model, model_version, alias, variant}   1 for each version a replica serves now
    ray_llmops_fallback_active                                    1 while the peak fallback answers
    ray_llmops_fallback_switches_total{to}                        switches to it (fallback) and back
"""

from __future__ import annotations

import functools

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


@functools.cache
def metric(kind: str, name: str, description: str, tags: tuple[str, ...],
           boundaries: tuple[float, ...] = ()):
    """One metric object per process (Ray registers a name once per worker). Outside a replica
    (the closed-loop controller's actor) Serve adds no tags of its own."""
    from ray.serve import metrics

    if kind == "histogram":
        return metrics.Histogram(name, description=description, boundaries=list(boundaries),
                                 tag_keys=tags)
    return getattr(metrics, kind.capitalize())(name, description=description, tag_keys=tags)


def request_answered(model: str | None, version: str | None, outcome: str) -> None:
    metric("counter", "llmops_requests", "Answered texts by deciding model and outcome.",
            ("model", "model_version", "outcome")).inc(
        tags={"model": model or "none", "model_version": version or "none", "outcome": outcome})


def request_latency(model: str | None, seconds: float) -> None:
    metric("histogram", "llmops_request_latency_seconds", "Request latency at the ingress.",
            ("model",), tuple(LATENCY_BUCKETS_S)).observe(seconds, tags={"model": model or "none"})


def guardrail_action(action: str) -> None:
    metric("counter", "llmops_guardrail_actions", "Moderation actions taken.",
            ("action",)).inc(tags={"action": action})


def guardrail_finding(rule: str, action: str) -> None:
    """(Serve adds the `application` tag inside a replica.)"""
    metric("counter", "llmops_guardrail_findings", "Guardrail rule hits by rule and action.",
           ("rule", "action")).inc(tags={"rule": rule, "action": action})


def degraded(reason: str) -> None:
    metric("counter", "llmops_degraded_answers", "Answers given by a fallback (generator "
           "failed, timed out or its breaker was open; `peak`: skipped at a peak).",
           ("reason",)).inc(
        tags={"reason": reason})


def abstained(model: dict) -> None:
    """An answer the classifier `model` (its StageModel fields) was not sure of."""
    metric("counter", "llmops_abstentions", "Answers whose conformal prediction set was not "
           "exactly one label (routed to review).", ("model", "model_version")).inc(
        tags={"model": model["name"], "model_version": str(model["version"])})


def error(status: int) -> None:
    metric("counter", "llmops_errors", "Problem responses by HTTP status.",
            ("status",)).inc(tags={"status": str(status)})


def batch(model: str, version: str, size: int, seconds: float) -> None:
    tags = {"model": model, "model_version": version}
    metric("histogram", "llmops_batch_size", "Texts per forward pass.",
            ("model", "model_version"), tuple(BATCH_BUCKETS)).observe(size, tags=tags)
    metric("histogram", "llmops_model_batch_seconds", "Time of one forward pass.",
            ("model", "model_version"), tuple(LATENCY_BUCKETS_S)).observe(seconds, tags=tags)


def fallback_active(on: bool) -> None:
    """(Serve adds the `application` and `replica` tags.)"""
    metric("gauge", "llmops_fallback_active", "1 while the peak fallback (a distilled "
           "student) answers a pipeline replica's classifications.", ()).set(int(on))


def fallback_switch(on: bool) -> None:
    metric("counter", "llmops_fallback_switches", "Switches to the peak fallback and back.",
           ("to",)).inc(tags={"to": "fallback" if on else "champion"})
    fallback_active(on)


def model_info(identities: dict) -> None:
    """Mark the versions a replica serves (1). `identities` is `ModelSlot.identities()`. Ray
    drops a gauge series that is not set again within two export intervals, so the replica
    re-marks every few seconds and a swapped-out version disappears by itself."""
    gauge = metric("gauge", "llmops_model_info", "1 for each model version a replica serves.",
                    ("model", "model_version", "alias", "variant"))
    for variant in ("champion", "challenger", "fallback"):
        if (ident := identities.get(variant)) is not None:
            gauge.set(1, tags={"model": ident["name"], "model_version": ident["version"],
                               "alias": ident.get("alias") or "none", "variant": variant})
