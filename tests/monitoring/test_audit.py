"""The hash-chained audit log: tampering of any kind is found at its line, rotation keeps the
chain, a writer killed mid-load loses no acknowledged record, and the `llmops audit` commands."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import ROOT, running

from monitoring.audit import AuditChain, verify
from monitoring.config import AuditConfig


def _record(i: int) -> dict:
    return {"request_id": f"r{i}", "tenant": "acme", "principal": "alice",
            "application": "support", "input": f"ticket {i}", "output": "billing",
            "outcome": "ok", "latency_ms": 12.5}


@pytest.fixture
def chain(tmp_path) -> Path:
    """A folder holding a chain of 10 records written in three batches."""
    writer = AuditChain(tmp_path / "audit")
    for batch in ([0, 1, 2], [3, 4, 5, 6], [7, 8, 9]):
        writer.append([_record(i) for i in batch])
    return tmp_path / "audit"


def _lines(folder: Path) -> tuple[Path, list[str]]:
    [path] = sorted(folder.glob("audit-*.jsonl"))
    return path, path.read_text().splitlines(keepends=True)


def test_an_intact_chain_verifies_and_a_new_writer_continues_it(chain):
    assert verify(chain).to_dict() == {"ok": True, "records": 10, "files": 1, "first_bad": None}
    AuditChain(chain).append([_record(10)])
    _, lines = _lines(chain)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 12))
    assert json.loads(lines[10])["prev"] == json.loads(lines[9])["hash"]
    assert verify(chain).ok


@pytest.mark.parametrize("tamper, line, reason", [
    (lambda ls: ls[:4] + [ls[4].replace("ticket 4", "ticket 44")] + ls[5:], 5, "changed"),
    (lambda ls: ls[:3] + ls[4:], 4, "expected record 4, found 5"),
    (lambda ls: ls[:6] + [ls[7], ls[6]] + ls[8:], 7, "expected record 7, found 8"),
    (lambda ls: ls[:-1], 0, "removed at the end"),
])
def test_an_edited_deleted_swapped_or_truncated_line_is_found(chain, tamper, line, reason):
    path, lines = _lines(chain)
    path.write_text("".join(tamper(lines)))
    result = verify(chain)
    assert not result.ok and result.first_bad["line"] == line, result
    assert reason in result.first_bad["reason"]


def test_a_rewritten_hash_breaks_the_link_of_the_next_line(chain):
    """Forging one record and its own hash still breaks the chain at the following record."""
    from monitoring.audit import digest

    path, lines = _lines(chain)
    forged = json.loads(lines[2]) | {"output": "refund"}
    forged["hash"] = digest(forged)
    path.write_text("".join(lines[:2] + [json.dumps(forged) + "\n"] + lines[3:]))
    result = verify(chain)
    assert result.first_bad["line"] == 4 and "not linked" in result.first_bad["reason"]
    last = json.loads(lines[-1]) | {"output": "refund"}  # the newest has no next line: the head
    last["hash"] = digest(last)
    path.write_text("".join(lines[:-1] + [json.dumps(last) + "\n"]))
    assert "newest record was rewritten" in verify(chain).first_bad["reason"]


def test_rotation_by_size_keeps_one_chain_across_files(tmp_path):
    folder = tmp_path / "audit"
    writer = AuditChain(folder, AuditConfig(max_bytes=1024))
    for i in range(0, 40, 4):
        writer.append([_record(j) for j in range(i, i + 4)])
    files = sorted(folder.glob("audit-*.jsonl"))
    assert len(files) > 3 and all(f.stat().st_size < 1024 + 4 * 400 for f in files)
    assert verify(folder).to_dict() == {"ok": True, "records": 40, "files": len(files),
                                        "first_bad": None}
    first_of_second = json.loads(files[1].read_text().splitlines()[0])
    assert first_of_second["prev"] == json.loads(files[0].read_text().splitlines()[-1])["hash"]
    files[1].unlink()  # a whole file removed is found too
    assert "expected record" in verify(folder).first_bad["reason"]


WRITER = textwrap.dedent("""
    import sys
    from monitoring.audit import AuditChain
    chain = AuditChain(sys.argv[1])
    i = 0
    while True:
        batch = [{"request_id": f"r{i + k}", "input": "x" * 300} for k in range(8)]
        chain.append(batch)
        i += 8
        print(i, flush=True)  # acknowledged: every record up to r{i - 1} is on disk
""")


def test_a_writer_killed_mid_load_loses_no_acknowledged_record(tmp_path):
    folder = tmp_path / "audit"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    acked = 0
    while acked < 400:
        acked = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # mid-load: it may be halfway through a line
    proc.wait()
    AuditChain(folder)  # the next writer cuts off a torn last line
    result = verify(folder)
    assert result.ok and result.records >= acked, result
    logged = {json.loads(line)["request_id"] for f in sorted(folder.glob("audit-*.jsonl"))
              for line in f.read_text().splitlines()}
    assert {f"r{i}" for i in range(acked)} <= logged


def test_the_logger_actor_killed_mid_load_loses_no_acknowledged_record(ray_session, tmp_path):
    """Eight clients append through the cluster's one logger while Ray kills and restarts it:
    every append that returned is in the chain, and the chain verifies."""
    import threading
    import time

    import ray

    from monitoring.audit import logger

    folder = tmp_path / "audit"
    audit = logger(AuditConfig(), folder)
    acked: set[str] = set()
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            ids = [f"c{k}-{i}-{j}" for j in range(4)]
            ray.get(audit.append.remote([{"request_id": r} for r in ids]), timeout=120)
            acked.update(ids)  # acknowledged: only now may its request be answered
            i += 1

    def until(n: int) -> None:
        deadline = time.monotonic() + 120
        while len(acked) < n:
            assert time.monotonic() < deadline, len(acked)
            time.sleep(0.05)

    try:
        with running(stop, *[functools.partial(client, k) for k in range(8)], join_s=120):
            until(400)
            ray.kill(audit, no_restart=False)  # mid-load; Ray restarts it and retries the calls
            until(len(acked) + 400)
    finally:
        ray.kill(audit)
    assert verify(folder).ok
    logged = {json.loads(line)["request_id"] for f in sorted(folder.glob("audit-*.jsonl"))
              for line in f.read_text().splitlines()}
    assert acked <= logged and len(acked) >= 800


def _llmops(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=120)


def test_audit_commands_verify_and_export(tmp_path):
    folder = tmp_path / "audit"  # where settings put it under --data-dir
    start = datetime.now(UTC)
    writer = AuditChain(folder)
    writer.append([_record(i) | {"ts": (start + timedelta(hours=i)).isoformat()}
                   for i in range(5)])
    ok = _llmops(tmp_path, "audit", "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["records"] == 5, ok.stderr
    window = _llmops(tmp_path, "audit", "export", "--since", (start + timedelta(hours=1))
                     .isoformat(), "--until", (start + timedelta(hours=3)).isoformat())
    assert [json.loads(line)["request_id"] for line in window.stdout.splitlines()] == ["r1", "r2"]
    bad = _llmops(tmp_path, "audit", "export", "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "ISO 8601" in bad.stderr

    path, lines = _lines(folder)
    path.write_text("".join(lines[:1] + [lines[1].replace('"alice"', '"mallory"')] + lines[2:]))
    broken = _llmops(tmp_path, "audit", "verify")
    assert broken.returncode == 1
    assert broken.stdout.strip() == (f"audit chain BROKEN at {path.name} line 2: the record was "
                                     f"changed (its hash does not match)")


def test_a_truncated_tail_is_found_with_or_without_head_json(chain):
    """The anchor beside the folder catches what `head.json` would: both removed is broken too."""
    from monitoring.audit import AuditTampered, anchor_path

    path, lines = _lines(chain)
    path.write_text("".join(lines[:-2]))
    (chain / "head.json").unlink()
    result = verify(chain)
    assert not result.ok and "names record 10 (records removed at the end)" in \
        result.first_bad["reason"] and "audit.anchor" in result.first_bad["reason"]
    with pytest.raises(AuditTampered, match="ends at record 8 but audit.anchor names record 10"):
        AuditChain(chain)  # a restarted writer refuses to continue a cut chain
    anchor_path(chain).unlink()
    assert "cannot be checked" in verify(chain).first_bad["reason"]


def test_a_failed_write_leaves_no_gap_and_the_chain_goes_on(chain, monkeypatch):
    writer = AuditChain(chain)
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.append([_record(10), _record(11)])
    monkeypatch.setattr(os, "fsync", real_fsync)
    writer.append([_record(12)])
    _, lines = _lines(chain)
    assert [json.loads(line)["request_id"] for line in lines[-2:]] == ["r9", "r12"]
    assert json.loads(lines[-1])["seq"] == 11 and verify(chain).ok


def test_low_disk_space_refuses_before_the_disk_fills(tmp_path):
    from monitoring.audit import AuditDiskFull

    writer = AuditChain(tmp_path / "audit", AuditConfig(min_free_bytes=2**62))
    with pytest.raises(AuditDiskFull, match="min_free_bytes"):
        writer.append([_record(0)])
    assert not list((tmp_path / "audit").glob("audit-*.jsonl")) or verify(tmp_path / "audit").ok


def test_file_numbers_order_numerically_past_a_million_files(tmp_path):
    """Names sort by their day and their number as a number: file 1000000 follows 999999."""
    folder = tmp_path / "audit"
    writer = AuditChain(folder)
    writer.append([_record(0)])
    first = sorted(folder.glob("audit-*.jsonl"))[0]
    day = first.name.split("-")[1]
    later = folder / f"audit-{day}-999999.jsonl"
    first.rename(later)
    writer = AuditChain(folder, AuditConfig(max_bytes=1024))
    writer.append([{**_record(1), "input": "x" * 2000}])
    writer.append([_record(2)])
    assert (folder / f"audit-{day}-1000000.jsonl").exists()
    assert verify(folder).to_dict()["records"] == 3 and verify(folder).ok


def test_a_record_stays_one_line_whatever_its_text_holds(tmp_path):
    """Characters that line-based readers take for line breaks are escaped in the file, and the
    record reads back (and verifies) exactly as given."""
    text = "a\x85b\u2028c\u2029d\re\nf\x1cg \ud800"
    AuditChain(tmp_path / "audit").append([{**_record(0), "input": text}])
    [path] = (tmp_path / "audit").glob("audit-*.jsonl")
    [line] = path.read_text().splitlines()
    assert json.loads(line)["input"] == text
    assert verify(tmp_path / "audit").ok
