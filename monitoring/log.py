"""The inference log, the feedback log and the label queue's leases: append-only Parquet segments
under a folder or any fsspec URI, written off the request path, read back by window.

Each pipeline replica owns a `SegmentWriter`: records wait in memory and are written as one new
segment every `flush_interval_s`, or at once when `max_buffered` wait (the request that fills the
buffer waits for that write: memory stays bounded under any load). A segment is written under a
hidden name and renamed when complete, so readers never see half a file. On a graceful shutdown
the replica's `__del__` flushes what is left.

Records hold what drift checks and audits need, not the text: request id, time, tenant,
application, the model and version of every stage, text descriptors, a projected embedding, a
classifier's posterior under its training priors, the prediction, confidence, latency and
outcome.

A segment on a local disk is fsynced (file and folder) before it counts as written; a failed
write keeps its rows for the next try (the periodic flush backs off and goes on), so nothing
appended is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa

from monitoring.config import LogConfig
from monitoring.files import fsync_dir, is_local
from training.errors import LLMOpsError
from training.features import DESCRIPTORS

INFERENCE = "inference"
FEEDBACK = "feedback"
LEASE = "lease"  # a label queue's item handed to one reviewer for a while (`monitoring/leases.py`)
SHADOW = "shadow"  # the variant of a shadowing challenger's answers

INFERENCE_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("item", pa.int32()), ("ts", pa.timestamp("us", tz="UTC")),
    ("tenant", pa.string()), ("application", pa.string()), ("model", pa.string()),
    ("model_version", pa.string()), ("variant", pa.string()),
    ("stages", pa.map_(pa.string(), pa.string())),
    *[(d, pa.float32()) for d in DESCRIPTORS],
    ("embedding", pa.list_(pa.float32())), ("posterior", pa.list_(pa.float32())),
    ("prediction", pa.string()),
    ("confidence", pa.float32()), ("latency_ms", pa.float32()), ("outcome", pa.string()),
    ("text", pa.string()), ("output", pa.string()),  # a generator's answer (redacted)
])
# a classifier's answer gets a `label`, a generator's its corrected text (`correction`); segments
# written before the column existed read it as null
FEEDBACK_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("item", pa.int32()), ("label", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")), ("tenant", pa.string()), ("correction", pa.string()),
])
LEASE_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("item", pa.int32()), ("model", pa.string()),
    ("ts", pa.timestamp("us", tz="UTC")), ("tenant", pa.string()), ("reviewer", pa.string()),
    ("until", pa.timestamp("us", tz="UTC")),
])
SCHEMAS = {INFERENCE: INFERENCE_SCHEMA, FEEDBACK: FEEDBACK_SCHEMA, LEASE: LEASE_SCHEMA}
# What makes a record unique: while a compaction has written its merged segment but not yet
# removed the ones it merged, a reader sees both, and keeps one of each (a moderated post
# rewritten has two answers: its classifier's and its rewrite's generator's)
KEYS = {INFERENCE: ["request_id", "item", "model", "variant", "ts"],
        FEEDBACK: ["request_id", "item", "label", "ts"],
        LEASE: ["request_id", "item", "model", "reviewer", "ts"]}
PARTITION = "date"  # segments lie under <kind>/date=YYYY-MM-DD/ (UTC)
_log = logging.getLogger(__name__)


class LogUnavailable(LLMOpsError):
    """The log folder cannot be read or written: the platform's outage, not the caller's error."""

    status = 503
    headers = {"Retry-After": "5"}


def filesystem(uri: str):
    """(fsspec filesystem, root path without a trailing slash) of a folder or URI."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def now() -> datetime:
    return datetime.now(UTC)


def write_table(fs, folder: str, name: str, table: pa.Table) -> str:
    """`table` as the segment `folder/name`, written under a hidden name and renamed when
    complete (readers never see half a file); on a local disk fsynced, file and folder, first."""
    import pyarrow.parquet as pq

    fs.makedirs(folder, exist_ok=True)
    if is_local(fs):  # on disk, and named, before it counts as written
        path = Path(folder) / name
        tmp = path.with_name(f".{name}.tmp")
        with tmp.open("wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)
    else:  # object stores: a put is atomic and durable once it returns
        with fs.open(f"{folder}/.{name}.tmp", "wb") as f:
            pq.write_table(table, f, compression="zstd")
        fs.mv(f"{folder}/.{name}.tmp", f"{folder}/{name}")
    return f"{folder}/{name}"


class SegmentWriter:
    """Buffered, append-only Parquet writer for one kind of record (one per replica)."""

    @classmethod
    def from_settings(cls, settings: dict, kind: str) -> SegmentWriter:
        """A writer from what a replica receives: `{"uri": ..., **LogConfig fields}`."""
        from monitoring.compaction import compactor

        config = LogConfig.model_validate({k: v for k, v in settings.items() if k != "uri"})
        if config.compact_interval_s is not None:
            compactor(settings["uri"], config)  # the log's one compactor, started on first use
        return cls(settings["uri"], kind, config)

    def __init__(self, uri: str, kind: str, config: LogConfig, writer_id: str | None = None):
        self.schema = SCHEMAS[kind]
        self.fs, root = filesystem(uri)
        self.folder = f"{root}/{kind}"
        self.config = config
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self._rows: list[dict] = []
        self._write_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self.written = 0

    async def append(self, rows: Sequence[dict]) -> None:
        self._rows.extend(rows)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())
        if len(self._rows) >= self.config.max_buffered:
            await self.flush()

    async def _flush_periodically(self) -> None:
        """Flush every interval; a failed write is retried at the next (its rows kept), with
        the interval doubling up to a minute while the log stays unwritable."""
        wait = self.config.flush_interval_s
        while True:
            await asyncio.sleep(wait)
            try:
                await self.flush()
                wait = self.config.flush_interval_s
            except Exception as exc:
                _log.error("the %s log cannot be written (%s); %d rows kept for the next try",
                           self.folder, exc, len(self._rows))
                wait = min(60.0, wait * 2)

    async def flush(self) -> None:
        """Write everything buffered as one segment (in a thread: the event loop keeps serving).
        If the write fails its rows go back in front of the buffer and `LogUnavailable` is
        raised: nothing appended is ever dropped."""
        async with self._write_lock:
            rows, self._rows = self._rows, []
            if not rows:
                return
            try:
                await asyncio.to_thread(self.write_segment, rows)
            except Exception as exc:
                self._rows[:0] = rows
                raise LogUnavailable(f"cannot write the {self.folder} log: {exc}") from exc

    def write_segment(self, rows: list[dict]) -> str:
        path = write_table(self.fs, f"{self.folder}/{PARTITION}={_day(rows[0]['ts'])}",
                           f"{time.time_ns()}-{self.writer_id}.parquet",
                           pa.Table.from_pylist(rows, schema=self.schema))
        self.written += len(rows)
        return path

    async def close(self) -> None:
        """Stop the periodic flush and write what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self.flush()


def read(uri: str, kind: str = INFERENCE, *, last: int | None = None,
         since: datetime | None = None, until: datetime | None = None, shadow: bool = False,
         request_ids: Collection[str] | None = None, **equals: str) -> pd.DataFrame:
    """Records of `kind` in time order: those in [since, until), matching every `equals`
    column (for example `model="support-router"`) and, if given, one of `request_ids`, then
    the `last` N of them. A shadowing challenger's answers (variant `shadow`: nobody saw them)
    are left out unless `shadow`."""
    import pyarrow.dataset as ds

    condition = None
    for column, value in equals.items():
        if value is not None:
            condition = _and(condition, ds.field(column) == value)
    if request_ids is not None:
        condition = _and(condition, ds.field("request_id").isin(sorted(request_ids)))
    if kind == INFERENCE and not shadow:
        variant = ds.field("variant")
        condition = _and(condition, variant.is_null() | (variant != SHADOW))
    # a segment lies under the day of its first record, so one begun before midnight holds
    # records of the next day too: days are pruned with a day's margin
    if since is not None:
        condition = _and(condition, ds.field("ts") >= pa.scalar(since, pa.timestamp("us", "UTC")))
        condition = _and(condition, ds.field(PARTITION) >= _day(since - timedelta(days=1)))
    if until is not None:
        condition = _and(condition, ds.field("ts") < pa.scalar(until, pa.timestamp("us", "UTC")))
        condition = _and(condition, ds.field(PARTITION) <= _day(until))
    df = _scan(uri, kind, condition).drop_duplicates(KEYS[kind])
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    return df.tail(last).reset_index(drop=True) if last is not None else df


def _scan(uri: str, kind: str, condition, attempts: int = 10) -> pd.DataFrame:
    """The rows of every segment matching `condition`. A compaction (`monitoring/compaction.py`)
    may remove a listed segment before it is opened: the scan then starts again from a fresh
    listing, which has the merged segment instead, after a pause that grows with each try (a
    compactor busy merging a stream of new segments once won three tries in a row)."""
    import pyarrow.dataset as ds

    fs, root = filesystem(uri)
    folder, schema = f"{root}/{kind}", SCHEMAS[kind]
    for attempt in range(attempts):
        try:
            if not fs.exists(folder):
                return schema.empty_table().to_pandas()
            dataset = ds.dataset(folder, format="parquet", filesystem=fs,
                                 schema=schema.append(pa.field(PARTITION, pa.string())),
                                 partitioning=ds.partitioning(
                                     pa.schema([(PARTITION, pa.string())]), flavor="hive"),
                                 exclude_invalid_files=False)
            return dataset.to_table(filter=condition, columns=schema.names).to_pandas()
        except FileNotFoundError as exc:
            if attempt == attempts - 1:
                raise LogUnavailable(f"the {kind} log at {uri} kept changing under a read"
                                     ) from exc
            time.sleep(0.02 * (attempt + 1))
        except OSError as exc:
            raise LogUnavailable(f"cannot read the {kind} log at {uri}: {exc}") from exc


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _and(a, b):
    return b if a is None else a & b


def by_generator(log: pd.DataFrame) -> pd.Series:
    """Which records are a generator's answers: their text as `output`, or no posterior (a
    classifier's answer carries one; a generator's text may not be kept)."""
    text = log.output.notna() if "output" in log else pd.Series(False, index=log.index)
    return text | log.posterior.isna() if "posterior" in log else text


def with_feedback(log: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The log with `label` and `correction` columns from feedback: the latest of each for the
    record's request and item. An item with two answers, a moderated post's label and its
    rewrite, splits them: the generator's record (`by_generator`) gets the correction, the
    classifier's the label."""
    key = ["request_id", "item"]
    out = log
    for column in ("label", "correction"):
        given = feedback[feedback[column].notna()] if column in feedback else feedback.iloc[:0]
        out = out.merge(given.sort_values("ts").drop_duplicates(key, keep="last")
                        .reindex(columns=[*key, column]), on=key, how="left")
    text = by_generator(out)
    alone = ~out.duplicated(key, keep=False)  # the item's only answer takes either
    return out.assign(label=out.label.where(alone | ~text),
                      correction=out.correction.where(alone | text))
