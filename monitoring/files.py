"""Local files that must survive a crash: written whole or not at all, on disk before the
caller is told they are, and moved aside (never crash-looped on) when found corrupt."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from monitoring.gauges import gauge, hold

_log = logging.getLogger(__name__)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is the local disk (where fsync applies)."""
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` (a new or renamed file) survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` by `data`: a crash leaves the old or the new content, and once this
    returns the new content and its name are on disk (file and folder fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def quarantine(path: str | Path, why: str, fs=None) -> str:
    """Move a corrupt file aside (`<name>.corrupt-<unix time>`, on `fs`, an fsspec filesystem,
    or the local disk), log it, count it for the `LLMOpsStateFileCorrupt` alert and return
    where it went: the service starts afresh beside it (never a crash loop), and an operator
    can inspect or restore it."""
    aside = f"{path}.corrupt-{int(time.time())}"
    if fs is None:
        Path(path).replace(aside)
        fsync_dir(Path(path).parent)
    else:
        fs.mv(str(path), aside)
    _log.error("%s is corrupt (%s); moved aside to %s and started from empty", path, why, aside)
    report_quarantined(Path(str(path)).name)
    return aside


_quarantined: dict[str, int] = {}


def report_quarantined(name: str, moved: int = 1) -> None:
    """`ray_llmops_state_files_quarantined{file}`: files of that name moved aside since the
    process started, held (`monitoring/gauges.py`); 0 is reported too, so the alert's series
    exists before anything breaks."""
    _quarantined[name] = _quarantined.get(name, 0) + moved
    try:
        import ray

        if ray.is_initialized():
            hold(gauge("llmops_state_files_quarantined", "Corrupt state files moved aside "
                       "(quota ledger, controller state) since the process started.",
                       ("file",)), _quarantined[name], {"file": name})
    except Exception as exc:  # metrics must never stop the service
        _log.warning("could not report a quarantined file: %s", exc)
