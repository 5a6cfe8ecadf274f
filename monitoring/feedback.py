"""Ground-truth labels from human review, checked against the inference log: the request must
have been logged and the label must belong to the label set of the model that answered it.
Accepted labels join the log by request id (`monitoring.log.with_feedback`) for drift checks
and retraining."""

from __future__ import annotations

from monitoring.log import INFERENCE, read
from training.errors import LLMOpsError


class UnknownRequest(LLMOpsError):
    """Feedback for a request id the inference log does not hold (yet: logs are written about
    once per `flush_interval_s`)."""

    status = 404


class InvalidLabel(LLMOpsError):
    status = 422


def feedback_row(log_uri: str, labels_of, request_id: str, item: int, label: str,
                 tenant: str) -> dict:
    """The feedback record for `label` on text `item` of `request_id`, or a typed error.
    `labels_of(model, version)` returns a model version's label set. Only `tenant`'s own
    requests can be labelled: another tenant's request is as unknown as one never made."""
    logged = read(log_uri, INFERENCE, request_id=request_id, tenant=tenant)
    logged = logged[logged["item"] == item]
    if logged.empty:
        raise UnknownRequest(f"no logged request {request_id!r} with item {item}; feedback can "
                             f"only label answered requests")
    record = logged.iloc[-1]
    if record.model is None or record.outcome != "ok":
        raise InvalidLabel(f"request {request_id!r} did not get a prediction to label")
    labels = labels_of(record.model, record.model_version)
    if not labels:
        raise InvalidLabel(f"{record.model} answers with text, not a label: feedback labels "
                           f"classifiers' answers")
    if label not in labels:
        raise InvalidLabel(f"label {label!r} is not one of {record.model}'s labels: "
                           f"{', '.join(labels)}")
    return {"request_id": request_id, "item": item, "label": label, "tenant": record.tenant}
