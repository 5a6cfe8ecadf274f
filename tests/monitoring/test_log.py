"""The inference log (`monitoring/log.py`, `monitoring/compaction.py`): segments written in
batches with bounded memory, compaction that loses nothing (a merge cut off midway included),
reads while it writes and compacts, a failed write that keeps its rows, feedback joined by
request and item (a rewritten post's two answers each with its own)."""

import asyncio
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import log_record, running

from monitoring.config import LogConfig
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now, read, with_feedback


def test_segment_writer_batches_bounds_memory_and_flushes_on_close(tmp_path):
    uri = str(tmp_path / "log")

    async def scenario() -> list[int]:
        writer = SegmentWriter(uri, INFERENCE, LogConfig(flush_interval_s=0.2, max_buffered=50))
        seen = []
        await writer.append([log_record(i) for i in range(10)])
        seen.append(len(read(uri)))  # buffered, not written on the request path
        await asyncio.sleep(0.5)
        seen.append(len(read(uri)))  # the periodic flush wrote them
        await writer.append([log_record(i) for i in range(10, 70)])  # over max_buffered: written now
        seen.append(len(read(uri)))
        await writer.append([log_record(i) for i in range(70, 75)])
        await writer.close()  # what a replica's graceful shutdown does
        seen.append(len(read(uri)))
        return seen

    assert asyncio.run(scenario()) == [0, 10, 70, 75]
    log = read(uri)
    assert list(log.request_id) == [f"r{i}" for i in range(75)]  # time order
    assert list(read(uri, last=5).request_id) == [f"r{i}" for i in range(70, 75)]
    assert read(uri, model="moderation").empty
    assert len(read(uri, since=log.ts[10])) == 65
    assert len(read(uri, until=log.ts[10])) == 10
    hidden = [p for p in (tmp_path / "log").rglob("*") if p.name.startswith(".")]
    assert not hidden  # no half-written segment left behind
    assert read(uri, FEEDBACK).empty


def _segments(uri: str, kind: str = INFERENCE) -> list:
    return sorted(p for p in (Path(uri) / kind).rglob("*.parquet") if not p.name.startswith("."))


def test_compaction_merges_small_segments_per_day_and_loses_nothing(tmp_path):
    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    yesterday = now() - timedelta(days=1)
    for i in range(24):  # 12 segments a day, two days
        writer.write_segment([log_record(i * 3 + j, ts=yesterday if i % 2 else now())
                              for j in range(3)])
    SegmentWriter(uri, FEEDBACK, LogConfig()).write_segment(
        [{"request_id": "r1", "item": 0, "label": "billing", "ts": now(), "tenant": "default"}])
    before = read(uri)
    assert len(_segments(uri)) == 24 and len(before) == 72

    small = compact(uri, INFERENCE, target_bytes=4 * _segments(uri)[0].stat().st_size)
    assert small.written >= 4 and small.merged > small.written  # bins of up to the target
    assert len(_segments(uri)) < 24
    done = compact(uri, INFERENCE, target_bytes=2**26)
    assert len(_segments(uri)) == 2  # one per day
    assert done.merged == small.written + (24 - small.merged)
    after = read(uri)
    pd.testing.assert_frame_equal(after.sort_values("request_id").reset_index(drop=True),
                                  before.sort_values("request_id").reset_index(drop=True))
    assert compact(uri, INFERENCE, target_bytes=2**26).merged == 0  # nothing small is left
    assert compact(uri, FEEDBACK, target_bytes=2**26).merged == 0  # one segment stays as it is
    assert len(read(uri, since=now() - timedelta(hours=1))) == 36  # pruned by day, then by time


def test_a_merge_cut_off_before_its_removals_leaves_copies_readers_never_see(tmp_path,
                                                                            monkeypatch):
    import fsspec.implementations.local as local

    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    for i in range(5):
        writer.write_segment([log_record(i)])
    real_rm = local.LocalFileSystem.rm
    monkeypatch.setattr(local.LocalFileSystem, "rm", lambda *a, **k: (_ for _ in ()).throw(
        OSError("the compactor died here")))
    with pytest.raises(OSError, match="died here"):
        compact(uri, INFERENCE, target_bytes=2**26)
    assert len(_segments(uri)) == 6  # the merged segment and the five it merged
    assert sorted(read(uri).request_id) == [f"r{i}" for i in range(5)]  # each record once
    monkeypatch.setattr(local.LocalFileSystem, "rm", real_rm)
    compact(uri, INFERENCE, target_bytes=2**26)  # the next pass removes the copies
    assert len(_segments(uri)) == 1
    assert sorted(read(uri).request_id) == [f"r{i}" for i in range(5)]


def test_reads_while_the_log_is_written_and_compacted_see_every_record_once(tmp_path):
    """A writer, a compactor and a reader at once: each read holds every record written before
    it began, none twice."""
    import threading

    from monitoring.compaction import compact

    uri = str(tmp_path / "log")
    writer = SegmentWriter(uri, INFERENCE, LogConfig())
    writer.write_segment([log_record(0)])
    written, stop, errors = [1], threading.Event(), []

    def write() -> None:
        for i in range(1, 120):
            writer.write_segment([log_record(i)])
            written[0] = i + 1

    def compact_all() -> None:
        while not stop.is_set():
            try:
                compact(uri, INFERENCE, target_bytes=2**26)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    with running(stop, write, compact_all) as threads:
        reads = 0
        while threads[0].is_alive() or reads < 5:
            floor = written[0]
            ids = list(read(uri).request_id)
            assert len(ids) == len(set(ids)) >= floor
            reads += 1
    assert not errors
    assert sorted(read(uri).request_id) == sorted(f"r{i}" for i in range(120))


def test_a_failed_segment_write_keeps_its_rows_and_the_flusher_goes_on(tmp_path, monkeypatch):
    """The log folder unwritable for a while: nothing appended is dropped, the periodic flush
    keeps trying, and the rows land once it is writable again."""
    from monitoring.log import LogUnavailable

    uri = str(tmp_path / "log")
    real = SegmentWriter.write_segment
    broken = {"on": True}

    def flaky(self, rows):
        if broken["on"]:
            raise OSError("no space left on device")
        return real(self, rows)

    monkeypatch.setattr(SegmentWriter, "write_segment", flaky)

    async def scenario() -> None:
        writer = SegmentWriter(uri, INFERENCE, LogConfig(flush_interval_s=0.05))
        await writer.append([log_record(i) for i in range(5)])
        with pytest.raises(LogUnavailable, match="no space left"):
            await writer.flush()
        await writer.append([log_record(5)])
        await asyncio.sleep(0.3)  # several periodic flushes fail meanwhile
        assert writer._flusher is not None and not writer._flusher.done()
        broken["on"] = False
        await asyncio.sleep(2)  # the backed-off flusher retries
        assert len(read(uri)) == 6
        await writer.close()

    asyncio.run(scenario())
    assert list(read(uri).request_id) == [f"r{i}" for i in range(6)]


def test_feedback_joins_by_request_and_item_latest_label_wins(tmp_path):
    log = pd.DataFrame([log_record(1), log_record(2), {**log_record(2), "item": 1}])
    t = now()
    feedback = pd.DataFrame([
        {"request_id": "r2", "item": 1, "label": "refund", "ts": t, "tenant": "default"},
        {"request_id": "r2", "item": 1, "label": "billing", "ts": t + timedelta(seconds=1),
         "tenant": "default"}])
    joined = with_feedback(log, feedback)
    assert joined.label.isna().tolist() == [True, True, False]
    assert joined.label.iloc[2] == "billing"



def test_a_rewritten_posts_two_answers_are_kept_and_take_their_own_feedback(tmp_path):
    """A moderated post that was rewritten has two records of one request and item: its
    classifier's label and its generator's text. Both are read back; a label joins the first,
    a correction the second, whichever came last."""
    from monitoring.feedback import Label, feedback_rows

    uri, t = str(tmp_path / "log"), now()
    post = log_record(1, application="moderation", model="moderation", prediction="toxic", ts=t,
                      posterior=[0.2, 0.8])
    rewrite = {**post, "model": "rewriter", "prediction": "stop", "output": "a kind post",
               "posterior": None}
    SegmentWriter(uri, INFERENCE, LogConfig()).write_segment([post, rewrite])
    log = read(uri)
    assert sorted(log.model) == ["moderation", "rewriter"]
    labels = {"moderation": ["safe", "toxic"], "rewriter": []}
    [label, correction] = feedback_rows(uri, lambda model, _version: labels[model], [
        Label("r1", 0, "toxic", "default"), Label("r1", 0, None, "default", "be kind")])
    assert (label["label"], correction["correction"]) == ("toxic", "be kind")
    feedback = pd.DataFrame([{**label, "ts": t}, {**correction, "ts": t + timedelta(seconds=1)}])
    joined = with_feedback(log, feedback).set_index("model")
    assert joined.label["moderation"] == "toxic" and pd.isna(joined.correction["moderation"])
    assert joined.correction["rewriter"] == "be kind" and pd.isna(joined.label["rewriter"])
    # the rewrite's text not kept (`keep_text: false`): still the generator's, no label for it
    unkept = with_feedback(log.assign(output=None), feedback).set_index("model")
    assert unkept.label["moderation"] == "toxic" and pd.isna(unkept.label["rewriter"])
