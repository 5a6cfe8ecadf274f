"""Leases on the label queue (`monitoring/leases.py`): a page is handed to its reviewer, the
tenant's other reviewers get other items until the lease runs out, a reviewer's own leases hide
nothing from it, and other tenants are untouched."""

import time
from datetime import datetime

import numpy as np
import pytest
from conftest import log_record

from monitoring.config import LabelQueueConfig, LogConfig
from monitoring.leases import leased_page
from monitoring.log import FEEDBACK, INFERENCE, LEASE, LogUnavailable, SegmentWriter, now, read


def answers(uri: str) -> None:
    """40 answers of tenant `default` (r0-r39, r0 the least confident) and 5 of `neighbour`;
    every answer has its own direction, so coverage has 40 groups to choose from."""
    eye = np.eye(45, dtype=np.float32)
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment([
        log_record(i, confidence=0.3 + 0.01 * i, posterior=[0.5, 0.5], text=f"ticket {i}",
                   embedding=list(eye[i]), tenant="default" if i < 40 else "neighbour")
        for i in range(45)])


def ids(page: list[dict]) -> list[str]:
    return [it["request_id"] for it in page]


def test_a_page_is_leased_to_its_reviewer_and_other_reviewers_get_other_items(tmp_path):
    uri = str(tmp_path / "log")
    answers(uri)
    config = LabelQueueConfig(explore=0.5, lease_s=600)
    ana = leased_page(uri, "default", "ana", 10, config)
    assert len(ana) == 10 and all(datetime.fromisoformat(it["leased_until"]) > now() for it in ana)
    ben = leased_page(uri, "default", "ben", 10, config)
    assert len(ben) == 10 and not set(ids(ana)) & set(ids(ben))  # coverage too: no item twice
    # paging again: ana's own doubts again (coverage now spreads past ben's), none of ben's
    again = leased_page(uri, "default", "ana", 10, config)
    assert ids(again)[:5] == ids(ana)[:5] and not set(ids(again)) & set(ids(ben))
    # a labelled item leaves the queue for good
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment([
        {"request_id": ana[0]["request_id"], "item": 0, "label": "billing", "ts": now(),
         "tenant": "default"}])
    rest = leased_page(uri, "default", "cy", 40, config)
    mine = set(ids(ana) + ids(again))
    assert len(rest) == 40 - len(mine) - len(ben) and not set(ids(rest)) & (mine | set(ids(ben)))
    assert set(ids(leased_page(uri, "default", "ana", 40, config))) == mine - {ana[0]["request_id"]}
    # another tenant's queue is its own: leases of default's reviewers hide nothing there
    assert set(ids(leased_page(uri, "neighbour", "ben", 40, config))) == {
        f"r{i}" for i in range(40, 45)}
    leases = read(uri, LEASE)
    assert set(leases.reviewer) == {"ana", "ben", "cy"} and set(leases.tenant) == {
        "default", "neighbour"}


def test_a_lease_runs_out_and_leases_can_be_off(tmp_path):
    uri = str(tmp_path / "log")
    answers(uri)
    short = LabelQueueConfig(explore=0.0, lease_s=1.0)
    ana = leased_page(uri, "default", "ana", 5, short)
    assert ids(ana) == [f"r{i}" for i in range(5)]  # the least confident first
    assert ids(leased_page(uri, "default", "ben", 5, short)) == [f"r{i}" for i in range(5, 10)]
    time.sleep(1.2)
    assert ids(leased_page(uri, "default", "cy", 5, short)) == ids(ana)  # ana's ran out
    off = LabelQueueConfig(explore=0.0, lease_s=0)
    first, second = (leased_page(uri, "default", who, 5, off) for who in ("dee", "eve"))
    assert ids(first) == ids(second) == ids(ana)
    assert {it["leased_until"] for it in first} == {None}


def test_a_page_whose_leases_cannot_be_written_is_not_handed_out(tmp_path, monkeypatch):
    uri = str(tmp_path / "log")
    answers(uri)

    def full(self, rows):
        raise OSError("no space left on device")

    monkeypatch.setattr(SegmentWriter, "write_segment", full)
    with pytest.raises(LogUnavailable, match="cannot lease the page: no space left") as refused:
        leased_page(uri, "default", "ana", 5, LabelQueueConfig())
    assert refused.value.status == 503  # the platform's outage: over HTTP a 503, not a 4xx
