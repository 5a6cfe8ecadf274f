"""The audit log: one JSON line per inference (who asked what, what was answered), append-only
and hash-chained, so that an edited, removed, inserted or reordered line is detectable.

Every record carries `seq` (1, 2, ...), `prev` (the hash of the record before it, 64 zeros for
the first) and `hash`, the SHA-256 of its canonical JSON without `hash`. Files are
`<folder>/audit-<YYYYMMDD>-<NNNNNN>.jsonl`, a new one at UTC midnight and past `max_bytes`; the
chain runs on across files in day and number order (numbers compared as numbers).

Two anchors name the newest record (seq and hash), so removing lines at the end is detectable:
`head.json` in the folder and, independently, the anchor file beside the folder
(`<folder>.anchor`, or `monitoring.audit.anchor_file`: put it on another volume, or ship it, to
survive the loss of the whole folder). Both are replaced atomically after each fsynced batch:
they may lag a crash, never lead. `verify` checks the chain against both; a writer that finds
the chain shorter than an anchor refuses to continue it (the tail was cut), so requests are
refused (503) until an operator looks.

Durability: `AuditChain.append` writes a batch and fsyncs it before it returns (group commit):
a request is acknowledged only once its record is on disk, so after a crash every acknowledged
request has its record. The chain advances only after the write: a failed write is cut off
again and leaves no gap. A line torn by a crash (no newline yet) was never acknowledged; the
next writer cuts it off. The folder is local (fsync); ship it elsewhere with `export`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from monitoring.batching import GroupCommit
from monitoring.config import AuditConfig
from monitoring.files import fsync_dir, write_atomic
from monitoring.gauges import gauge, hold
from monitoring.singleton import keyed, singleton
from training.errors import LLMOpsError

GENESIS = "0" * 64
HEAD = "head.json"


def digest(record: dict) -> str:
    """The hash a record carries: SHA-256 of its canonical JSON, `hash` left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False, default=str)
                          .encode("utf-8", "surrogatepass")).hexdigest()


def input_hash(text: str) -> str:
    """What the audit keeps of the raw input: its SHA-256 (the record holds it redacted)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _line(record: dict) -> str:
    """A record as one line of JSON: JSON escapes the ASCII controls; the other characters that
    line-based readers take for line breaks (NEL, U+2028, U+2029) are escaped too."""
    return json.dumps(record, ensure_ascii=False, default=str).translate(_LINE_BREAKS) + "\n"


def _order(path: Path) -> tuple[str, int]:
    _, day, number = path.stem.split("-")
    return day, int(number)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-*-*.jsonl"), key=_order)


def anchor_path(folder: Path, config: AuditConfig | None = None) -> Path:
    """The independent anchor: `anchor_file`, or `<folder>.anchor` beside the folder."""
    if config is not None and config.anchor_file:
        return Path(config.anchor_file)
    return folder.parent / f"{folder.name}.anchor"


class AuditDiskFull(LLMOpsError):
    """Too little space left to write records safely: requests are refused until there is."""


class AuditTampered(LLMOpsError):
    """The chain on disk ends before the record an anchor names: it will not be continued."""


def _anchors(folder: Path, anchor: Path) -> list[tuple[str, dict]]:
    """(where, {"seq", "hash"}) of each anchor present."""
    found = []
    for where in (folder / HEAD, anchor):
        if where.exists():
            found.append((where.name, json.loads(where.read_text())))
    return found


class AuditChain:
    """The one writer of a folder's chain (several writers would fork it: on a cluster the
    pipelines send their records to one logger)."""

    def __init__(self, folder: str | Path, config: AuditConfig | None = None):
        self.folder = Path(folder)
        self.config = config or AuditConfig()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.anchor = anchor_path(self.folder, self.config)
        self.seq, self.last, self.path = 0, GENESIS, None
        files = _files(self.folder)
        if files:
            self.path = files[-1]
            self._cut_torn_line(self.path)
        for path in reversed(files):  # the chain ends in the newest file that has a line
            lines = path.read_bytes().splitlines()
            if lines:
                newest = json.loads(lines[-1])
                self.seq, self.last = newest["seq"], newest["hash"]
                break
        for where, anchor in _anchors(self.folder, self.anchor):
            if anchor["seq"] > self.seq:
                raise AuditTampered(f"the audit chain in {self.folder} ends at record {self.seq} "
                                    f"but {where} names record {anchor['seq']}: its tail was "
                                    f"removed; run `llmops audit verify` and restore it")

    @staticmethod
    def _cut_torn_line(path: Path) -> None:
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _target(self, now: datetime) -> Path:
        """The file the next line goes to: a new one on a new UTC day or past max_bytes."""
        day = now.strftime("%Y%m%d")
        if self.path is not None and self.path.name.startswith(f"audit-{day}-") and \
                self.path.stat().st_size < self.config.max_bytes:
            return self.path
        n = _order(self.path)[1] + 1 if self.path is not None and \
            self.path.name.startswith(f"audit-{day}-") else 1
        self.path = self.folder / f"audit-{day}-{n:06d}.jsonl"
        self.path.touch()
        fsync_dir(self.folder)  # the new name itself must survive a crash
        return self.path

    def append(self, records: list[dict]) -> list[dict]:
        """Chain, write and fsync `records` (one batch, one fsync); returns them as written."""
        if not records:
            return []
        free = shutil.disk_usage(self.folder).free
        if free < self.config.min_free_bytes:
            raise AuditDiskFull(f"{free} bytes free on the audit volume of {self.folder}, under "
                                f"monitoring.audit.min_free_bytes ({self.config.min_free_bytes})")
        now = datetime.now(UTC)
        path = self._target(now)
        seq, last, chained = self.seq, self.last, []
        for record in records:
            seq += 1
            line = {**record, "ts": record.get("ts") or now.isoformat(), "seq": seq,
                    "prev": last}
            line["hash"] = last = digest(line)
            chained.append(line)
        data = "".join(_line(r) for r in chained).encode("utf-8", "backslashreplace")
        with path.open("ab") as f:
            size = f.tell()
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                f.truncate(size)  # nothing of a failed batch stays: the next one follows on
                raise
        self.seq, self.last = seq, last  # only now: the chain advances after a durable write
        anchor = json.dumps({"seq": seq, "hash": last, "file": path.name})
        write_atomic(self.folder / HEAD, anchor)
        write_atomic(self.anchor, anchor)
        return chained


class AuditLogger:
    """The one writer of a cluster's audit chain, as an async Ray actor (`logger()` starts or
    finds it): appends that arrive while a batch is being written go together into the next one,
    one fsync per batch (group commit), and each call returns only once its records are on
    disk. Ray restarts it if its process dies; the new writer continues the chain from disk,
    and a call cut off by the crash is retried, so its records may be written twice, never
    lost."""

    def __init__(self, folder: str, config_json: str):
        self.chain = AuditChain(folder, AuditConfig.model_validate_json(config_json))
        self._reported = 0.0
        self.commit = GroupCommit(lambda records: asyncio.to_thread(self.chain.append, records))

    async def append(self, records: list[dict]) -> list[int]:
        """The records' sequence numbers, once they are on disk."""
        try:
            return [r["seq"] for r in await self.commit.submit(records)]
        finally:
            self._report_free_space()

    def _report_free_space(self) -> None:
        """`ray_llmops_audit_free_bytes` (alert `LLMOpsAuditDiskLow`), measured at most once a
        second and held between appends."""
        now = time.monotonic()
        if now - self._reported >= 1:
            self._reported = now
            hold(gauge("llmops_audit_free_bytes", "Free bytes on the audit log's volume."),
                 shutil.disk_usage(self.chain.folder).free)


def logger(config: AuditConfig, folder: str | Path):
    """The audit logger of `folder` on the connected Ray cluster, started on first use."""
    folder = str(Path(folder).resolve())
    return singleton(AuditLogger, keyed("llmops-audit", folder), folder, config.model_dump_json())


@dataclass
class Verification:
    ok: bool
    records: int
    files: int
    first_bad: dict | None = None  # file, line (1-based), seq, reason

    def to_dict(self) -> dict:
        return asdict(self)


def verify(folder: str | Path, anchor: str | Path | None = None) -> Verification:
    """Check the whole chain: each line's hash, its link to the line before, consecutive seq
    numbers, and that it ends where `head.json` and the anchor file (`anchor`, by default
    `<folder>.anchor`) say. A chain with records and neither anchor is broken: the writer
    always leaves both."""
    folder = Path(folder)
    anchor = Path(anchor) if anchor else anchor_path(folder)
    files = _files(folder)
    seq, last, count = 0, GENESIS, 0

    def bad(path: Path, number: int, reason: str, at: int | None = None) -> Verification:
        return Verification(False, count, len(files), {"file": path.name, "line": number,
                                                       "seq": at, "reason": reason})

    for path in files:
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                record = json.loads(raw)
            except ValueError:
                return bad(path, number, "not a JSON record")
            at = record.get("seq")
            if record.get("hash") != digest(record):
                return bad(path, number, "the record was changed (its hash does not match)", at)
            if at != seq + 1:
                return bad(path, number, f"expected record {seq + 1}, found {at} (records "
                                         f"removed or reordered)", at)
            if record.get("prev") != last:
                return bad(path, number, "not linked to the record before it", at)
            seq, last, count = at, record["hash"], count + 1
    anchors = _anchors(folder, anchor)  # written after each fsync: they may lag, never lead
    where = files[-1] if files else folder
    if count and not anchors:
        return bad(where, 0, f"neither {HEAD} nor {anchor.name} names the newest record (both "
                             f"removed): the end of the chain cannot be checked", seq)
    for name, head in anchors:
        if head["seq"] > seq:
            return bad(where, 0, f"the chain ends at record {seq} but {name} names record "
                                 f"{head['seq']} (records removed at the end)", seq)
        if head["seq"] == seq and head["hash"] != last:
            return bad(where, 0, f"the newest record was rewritten (it is not the one {name} "
                                 f"names)", seq)
    return Verification(True, count, len(files))


def find(folder: str | Path, request_id: str) -> dict | None:
    """The audit record of `request_id` (the newest, were there several), or None."""
    found, needle = None, json.dumps(request_id)
    for path in _files(Path(folder)):
        with path.open(encoding="utf-8") as f:
            for raw in f:
                if needle in raw and (record := json.loads(raw))["request_id"] == request_id:
                    found = record
    return found


def export(folder: str | Path, since: datetime | None = None,
           until: datetime | None = None) -> Iterator[str]:
    """The audit lines with `ts` in [since, until), as written (JSON lines for a shipper)."""
    for path in _files(Path(folder)):
        with path.open(encoding="utf-8") as f:
            for raw in f:
                ts = datetime.fromisoformat(json.loads(raw)["ts"])
                if (since is None or ts >= since) and (until is None or ts < until):
                    yield raw.rstrip("\n")
