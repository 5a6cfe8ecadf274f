"""Ground-truth labels from human review, checked against the inference log: the request must
have been logged and the label must belong to the label set of the model that answered it.
Accepted labels join the log by request id (`monitoring.log.with_feedback`) for drift checks
and retraining."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from monitoring.log import INFERENCE, read
from training.errors import LLMOpsError

# labelled requests before an accuracy counts: a drift window's, or each side of a canary's
MIN_LABELS = 30


class UnknownRequest(LLMOpsError):
    """Feedback for a request id the inference log does not hold (yet: logs are written about
    once per `flush_interval_s`)."""

    status = 404


class InvalidLabel(LLMOpsError):
    status = 422


class Label(NamedTuple):
    """One reviewer's label for text `item` of `request_id`, given by `tenant`."""

    request_id: str
    item: int
    label: str
    tenant: str


def feedback_rows(log_uri: str, labels_of, labels: Sequence[Label]) -> list[dict | LLMOpsError]:
    """The feedback record of each label, or its typed error in its place: one read of the log
    checks a whole batch (a reviewing team sends labels in bursts; the log is many segments).
    `labels_of(model, version)` returns a model version's label set. Only a label's own
    tenant's requests can be labelled: another tenant's request is as unknown as one never
    made."""
    logged = read(log_uri, INFERENCE, request_ids={lab.request_id for lab in labels})
    latest = {(r.request_id, r.item, r.tenant): r for r in logged.itertuples(index=False)}
    return [_checked(latest.get((lab.request_id, lab.item, lab.tenant)), lab, labels_of)
            for lab in labels]


def feedback_row(log_uri: str, labels_of, request_id: str, item: int, label: str,
                 tenant: str) -> dict:
    """The feedback record for one label, or its typed error raised."""
    [row] = feedback_rows(log_uri, labels_of, [Label(request_id, item, label, tenant)])
    if isinstance(row, LLMOpsError):
        raise row
    return row


def _checked(record, lab: Label, labels_of) -> dict | LLMOpsError:
    if record is None:
        return UnknownRequest(f"no logged request {lab.request_id!r} with item {lab.item}; "
                              f"feedback can only label answered requests")
    if record.model is None or record.outcome != "ok":
        return InvalidLabel(f"request {lab.request_id!r} did not get a prediction to label")
    labels = labels_of(record.model, record.model_version)
    if not labels:
        return InvalidLabel(f"{record.model} answers with text, not a label: feedback labels "
                            f"classifiers' answers")
    if lab.label not in labels:
        return InvalidLabel(f"label {lab.label!r} is not one of {record.model}'s labels: "
                            f"{', '.join(labels)}")
    return {"request_id": lab.request_id, "item": lab.item, "label": lab.label,
            "tenant": record.tenant}
