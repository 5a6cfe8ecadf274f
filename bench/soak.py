"""Memory under steady load: a mixed stream of moderation and support requests over HTTP for a
configurable time, with every policy on (token, quota, guardrails, audit) and the inference
log written, while the resident memory of every process of the Ray instance is sampled.

    python bench/soak.py --json [--minutes 30] [--concurrency 16] [--warmup-s 60] [--data-dir DIR]

Reported per process (named by its Ray title, e.g. `ray::ServeReplica:support:SupportPipeline`):
RSS at the end of the warm-up and at the end, and the slope of a least-squares line through the
samples after the warm-up, in MB per minute (the target: under 1 for every process). Also the
requests answered and failed, and whether every answered request has its audit record
(looked up by the correlation id each request sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack  # noqa: E402

from cluster import runtime  # noqa: E402


class Sampler(threading.Thread):
    """RSS of each Ray process every `every_s` seconds: pid -> [(t, MB)]."""

    def __init__(self, every_s: float):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.names = every_s, {}, {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            now = time.monotonic()
            for pid, name in stack.ray_processes().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    continue
                self.names[pid] = name
                self.samples.setdefault(pid, []).append((now, rss))
            self.stop.wait(self.every_s)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    import numpy as np

    t = np.array([p[0] for p in points]) / 60
    return float(np.polyfit(t - t[0], [p[1] for p in points], 1)[0]) if len(points) > 2 else 0.0


async def drive(base: str, headers: dict, texts: dict, concurrency: int, seconds: float,
                answered: list[str], verify) -> int:
    import httpx

    failed = 0
    deadline = time.monotonic() + seconds
    paths = [(name, path) for name, (_, path, _) in stack.PIPELINES.items()]
    async with httpx.AsyncClient(timeout=120, headers=headers, verify=verify,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int) -> None:
            nonlocal failed
            i = k
            while time.monotonic() < deadline:
                name, path = paths[i % 2]
                rid = uuid.uuid4().hex
                try:
                    r = await client.post(base + path, json={"text": texts[name][i % 256]},
                                          headers={"X-Request-ID": rid})
                    if r.status_code == 200:
                        answered.append(rid)
                    else:
                        failed += 1
                except httpx.HTTPError:
                    failed += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return failed


def audited_ids(folder: Path) -> set[str]:
    ids = set()
    for path in folder.glob("audit-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            ids.add(record.get("correlation_id") or record.get("request_id"))
    return ids


def _slopes(sampler: Sampler, warm: float) -> list[dict]:
    """Each sampled process's memory after warm-up and its slope, steepest first."""
    processes = []
    for pid, points in sampler.samples.items():
        after = [p for p in points if p[0] >= warm]
        if len(after) < 3:
            continue
        processes.append({"process": sampler.names[pid], "pid": pid,
                          "rss_mb_after_warmup": round(after[0][1], 1),
                          "rss_mb_end": round(after[-1][1], 1),
                          "slope_mb_per_min": round(slope_mb_per_min(after), 3)})
    return sorted(processes, key=lambda p: -p["slope_mb_per_min"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--data-dir", help="a data dir with trained champions (default: scratch)")
    parser.add_argument("--port", type=int, default=8023)
    parser.add_argument("--tls", action="store_true", help=stack.TLS_HELP)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray

    from serve_apps.auth import issue
    from serve_apps.deploy import serve_config
    from serve_apps.tls import client_context

    settings, registry = stack.platform(args.data_dir, {
        "monitoring": {"audit": {"folder": tempfile.mkdtemp()}},
        "serve": {"port": args.port, "use_gpu": "no", "chat": {"enabled": False},
                  "advisor": {"enabled": False},
                  "quota": {"tenants": {"soak": stack.UNLIMITED}}, **stack.https_settings(args.tls)}})
    texts = stack.sample_texts(13)
    token = issue(settings.serve.auth, settings.data_dir, tenant="soak",
                  scopes=["moderate", "support"], ttl_s=int(args.minutes * 60 + 3600))

    cluster = stack.start_ray(settings)
    cluster.deploy(serve_config(settings.serve, registry.tracking_uri, False,
                                dict(runtime.PLATFORM_ENV), settings.log_settings(),
                                settings.governance()), timeout_s=600)
    sampler = Sampler(args.sample_s)
    sampler.start()
    answered: list[str] = []
    seconds = args.minutes * 60
    started = time.monotonic()
    failed = asyncio.run(drive(settings.serve.url, {"Authorization": f"Bearer {token}"}, texts,
                               args.concurrency, seconds, answered,
                               client_context(settings.serve.tls)))
    elapsed = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    cluster.shutdown()
    ray.shutdown()

    processes = _slopes(sampler, started + args.warmup_s)
    missing = len(set(answered) - audited_ids(settings.audit_dir))
    report = {"benchmark": "soak", "cpus": os.cpu_count(), "tls": args.tls,
              "minutes": round(elapsed / 60, 2),
              "warmup_s": args.warmup_s, "concurrency": args.concurrency,
              "models": stack.models_of(args.data_dir),
              "requests_answered": len(answered), "requests_failed": failed,
              "answered_missing_from_audit": missing,
              "max_slope_mb_per_min": processes[0]["slope_mb_per_min"] if processes else None,
              "total_slope_mb_per_min": round(sum(p["slope_mb_per_min"] for p in processes), 3),
              "target_met": bool(processes) and failed == 0 and missing == 0 and
              all(p["slope_mb_per_min"] < 1 for p in processes),
              "processes": processes}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
