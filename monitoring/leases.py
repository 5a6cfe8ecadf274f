"""Leases on the label queue's items: a page of `GET /v1/feedback/pending` is handed to the
reviewer who asked for it for `LabelQueueConfig.lease_s`, and the pages of the tenant's other
reviewers leave those items out until the lease runs out (a labelled item leaves the queue for
good), as Label Studio locks a task to its annotator. Without it, two reviewers paging at once
were handed the same most useful answers and spent the scarce labels twice. A reviewer's own
leases hide nothing from it: paging again shows its unlabelled items again, with a new lease.

A lease is a row of the log's `lease` kind, the store the labels go to, so every replica of the
feedback application sees it. A replica makes its pages one at a time (`FeedbackService`), so
its leases are written before its next page is ranked; two replicas ranking in the same instant
can still hand out an item twice."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from monitoring.config import LabelQueueConfig, LogConfig
from monitoring.feedback import pending
from monitoring.log import LEASE, LogUnavailable, SegmentWriter, now, read


def held(uri: str, tenant: str, reviewer: str, at: datetime,
         lease_s: float) -> set[tuple[str, int, str]]:
    """The items (request id, item, model) of `tenant` leased at `at` to reviewers other than
    `reviewer`."""
    if lease_s <= 0:
        return set()
    rows = read(uri, LEASE, since=at - timedelta(seconds=lease_s), tenant=tenant)
    rows = rows[(rows.until > at) & (rows.reviewer != reviewer)]
    return set(zip(rows.request_id, rows.item.astype(int), rows.model))


def leased_page(uri: str, tenant: str, reviewer: str, limit: int, config: LabelQueueConfig,
                model: str | None = None, since: datetime | None = None,
                drift_onset: Callable[[str, str], datetime | None] | None = None) -> list[dict]:
    """`reviewer`'s page of `tenant`'s label queue (`monitoring.feedback.pending`), less the
    items leased to others, each item leased to `reviewer` (its `leased_until`; None when
    `config.lease_s` is 0)."""
    at = now()
    items = pending(uri, tenant, limit, config, model, since, drift_onset,
                    held(uri, tenant, reviewer, at, config.lease_s))
    if config.lease_s <= 0 or not items:
        return [{**it, "leased_until": None} for it in items]
    until = at + timedelta(seconds=config.lease_s)
    try:  # a page whose leases are not written is not handed out
        SegmentWriter(uri, LEASE, LogConfig()).write_segment([
            {"request_id": it["request_id"], "item": it["item"], "model": it["model"], "ts": at,
             "tenant": tenant, "reviewer": reviewer, "until": until} for it in items])
    except OSError as exc:
        raise LogUnavailable(f"cannot lease the page: {exc}") from exc
    return [{**it, "leased_until": until.isoformat()} for it in items]
