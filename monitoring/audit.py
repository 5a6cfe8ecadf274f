"""The audit log: one JSON line per inference (who asked what, what was answered), append-only
and hash-chained, so that an edited, removed, inserted or reordered line is detectable.

Every record carries `seq` (1, 2, ...), `prev` (the hash of the record before it, 64 zeros for
the first) and `hash`, the SHA-256 of its canonical JSON without `hash`. Files are
`<folder>/audit-<YYYYMMDD>-<NNNN>.jsonl`, a new one at UTC midnight and past `max_bytes`; the
chain runs on across files in name order. `head.json` names the newest record, so removing
lines at the end is detectable too.

Durability: `AuditChain.append` writes a batch and fsyncs it before it returns (group commit):
a request is acknowledged only once its record is on disk, so after a crash every acknowledged
request has its record. A line torn by a crash (no newline yet) was never acknowledged; the next
writer cuts it off. The folder is local (fsync); ship it elsewhere with `export`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from monitoring.batching import GroupCommit
from monitoring.config import AuditConfig
from monitoring.singleton import keyed, singleton

GENESIS = "0" * 64
HEAD = "head.json"


def digest(record: dict) -> str:
    """The hash a record carries: SHA-256 of its canonical JSON, `hash` left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False, default=str).encode()).hexdigest()


def input_hash(text: str) -> str:
    """What the audit keeps of the raw input: its SHA-256 (the record holds it redacted)."""
    return hashlib.sha256(text.encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-*.jsonl"))


class AuditChain:
    """The one writer of a folder's chain (several writers would fork it: on a cluster the
    pipelines send their records to one logger)."""

    def __init__(self, folder: str | Path, config: AuditConfig | None = None):
        self.folder = Path(folder)
        self.config = config or AuditConfig()
        self.folder.mkdir(parents=True, exist_ok=True)
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
        n = int(self.path.stem.rsplit("-", 1)[1]) + 1 if self.path is not None and \
            self.path.name.startswith(f"audit-{day}-") else 1
        self.path = self.folder / f"audit-{day}-{n:04d}.jsonl"
        self.path.touch()
        fd = os.open(self.folder, os.O_RDONLY)  # the new name itself must survive a crash
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path

    def append(self, records: list[dict]) -> list[dict]:
        """Chain, write and fsync `records` (one batch, one fsync); returns them as written."""
        if not records:
            return []
        now = datetime.now(UTC)
        path = self._target(now)
        chained = []
        for record in records:
            self.seq += 1
            line = {**record, "ts": record.get("ts") or now.isoformat(), "seq": self.seq,
                    "prev": self.last}
            line["hash"] = self.last = digest(line)
            chained.append(line)
        data = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in chained)
        with path.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp = self.folder / f".{HEAD}.tmp"
        tmp.write_text(json.dumps({"seq": self.seq, "hash": self.last, "file": path.name}))
        tmp.replace(self.folder / HEAD)
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
        self.commit = GroupCommit(lambda records: asyncio.to_thread(self.chain.append, records))

    async def append(self, records: list[dict]) -> list[int]:
        """The records' sequence numbers, once they are on disk."""
        return [r["seq"] for r in await self.commit.submit(records)]


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


def verify(folder: str | Path) -> Verification:
    """Check the whole chain: each line's hash, its link to the line before, consecutive seq
    numbers, and that it ends where `head.json` says."""
    folder = Path(folder)
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
    head_path = folder / HEAD  # written after each fsync: it may lag a crash, never lead
    if head_path.exists():
        head, where = json.loads(head_path.read_text()), files[-1] if files else head_path
        if head["seq"] > seq:
            return bad(where, 0, f"the chain ends at record {seq} but was written up to "
                                 f"{head['seq']} (records removed at the end)", seq)
        if head["seq"] == seq and head["hash"] != last:
            return bad(where, 0, "the newest record was rewritten (it is not the one written)",
                       seq)
    return Verification(True, count, len(files))


def export(folder: str | Path, since: datetime | None = None,
           until: datetime | None = None) -> Iterator[str]:
    """The audit lines with `ts` in [since, until), as written (JSON lines for a shipper)."""
    for path in _files(Path(folder)):
        with path.open(encoding="utf-8") as f:
            for raw in f:
                ts = datetime.fromisoformat(json.loads(raw)["ts"])
                if (since is None or ts >= since) and (until is None or ts < until):
                    yield raw.rstrip("\n")
