"""Compaction of the inference, feedback and lease logs: every replica writes a small segment each
flush interval (thousands a day per replica), and every reader (drift checks, the controller,
feedback lookups) opens every segment it cannot rule out by day. Small segments of a day are
merged into segments of up to `LogConfig.segment_target_bytes`, as table formats do
(bin-packing `OPTIMIZE`), so the number of files stays about one per day and target size.

A merge writes its segment first (hidden name, renamed when complete) and then removes the
segments it merged: a reader in between sees both and keeps one copy of each record
(`monitoring.log.KEYS`); one that listed a removed segment reads again. Nothing is ever lost:
a merge that fails before the removals leaves both, and the next merge removes the copies.

One compactor per log runs as a singleton actor (`compactor()`), started by the first replica
that writes the log.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa

from monitoring.config import LogConfig
from monitoring.log import KEYS, SCHEMAS, filesystem, write_table
from monitoring.singleton import keyed, singleton

log = logging.getLogger(__name__)


@dataclass
class Compacted:
    merged: int = 0  # segments merged away
    written: int = 0  # segments written in their place


def compact(uri: str, kind: str, target_bytes: int) -> Compacted:
    """Merge the small segments of every day of `kind`'s log at `uri`."""
    fs, root = filesystem(uri)
    folder, done = f"{root}/{kind}", Compacted()
    if not fs.exists(folder):
        return done
    for day in fs.ls(folder, detail=True):
        if day["type"] != "directory":
            continue
        segments = sorted((f for f in fs.ls(day["name"], detail=True)
                           if f["name"].endswith(".parquet")
                           and not f["name"].rsplit("/", 1)[-1].startswith(".")
                           and f["size"] < target_bytes // 2), key=lambda f: f["name"])
        for group in _bins(segments, target_bytes):
            _merge(fs, day["name"], [f["name"] for f in group], kind)
            done.merged += len(group)
            done.written += 1
    return done


def _bins(segments: list[dict], target_bytes: int) -> list[list[dict]]:
    """Consecutive runs of segments whose sizes add up to at most the target; runs of one are
    left as they are."""
    bins, current, size = [], [], 0
    for segment in segments:
        if current and size + segment["size"] > target_bytes:
            bins.append(current)
            current, size = [], 0
        current.append(segment)
        size += segment["size"]
    bins.append(current)
    return [b for b in bins if len(b) > 1]


def _merge(fs, folder: str, paths: list[str], kind: str) -> None:
    import pyarrow.parquet as pq

    schema = SCHEMAS[kind]
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=schema))
    merged = pa.concat_tables(tables)
    # a merge interrupted between its write and its removals left copies: drop them now
    copies = merged.select(KEYS[kind]).to_pandas().duplicated().to_numpy()
    if copies.any():
        merged = merged.filter(pa.array(~copies))
    first = paths[0].rsplit("/", 1)[-1].split("-", 1)[0]  # keeps the names in time order
    write_table(fs, folder, f"{first}-merged-{uuid.uuid4().hex[:12]}.parquet", merged)
    for path in paths:
        fs.rm(path)


class LogCompactor:
    """The compactor of one log as a detached actor: it compacts every kind every
    `compact_interval_s` (a failed pass is logged and tried again at the next)."""

    def __init__(self, uri: str, config_json: str):
        import threading

        self.uri, self.config = uri, LogConfig.model_validate_json(config_json)
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.config.compact_interval_s)
            try:
                self.compact()
            except Exception:
                log.exception("compacting the log at %s failed; trying again later", self.uri)

    def compact(self) -> dict[str, int]:
        """One pass now: segments merged away and written, of every kind."""
        with self.lock:
            total = Compacted()
            for kind in SCHEMAS:
                done = compact(self.uri, kind, self.config.segment_target_bytes)
                total.merged += done.merged
                total.written += done.written
            pa.default_memory_pool().release_unused()  # the pool would keep the largest pass
            return {"merged": total.merged, "written": total.written}


def compactor(uri: str, config: LogConfig):
    """The compactor of the log at `uri` on the connected Ray cluster, started on first use."""
    return singleton(LogCompactor, keyed("llmops-log-compactor", uri), uri,
                     config.model_dump_json())
