"""What the benchmarks share: settings on a data dir (a scratch one with every task's
configured architecture registered untrained, or one holding trained champions), the texts they
send, and a local Ray head with the platform's environment and its Serve cluster; the main of
an offline benchmark (`report`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import runtime  # noqa: E402
from cluster.settings import Settings, load_settings  # noqa: E402
from training.data import generate  # noqa: E402

# pipeline -> (dataset of its texts, HTTP path, handle method)
PIPELINES = {"support": ("support-tickets", "/v1/support/route", "route"),
             "moderation": ("moderation", "/v1/moderate", "moderate")}
UNLIMITED = {"requests_per_day": None, "tokens_per_day": None, "requests_per_second": None}


TLS_HELP = "serve over HTTPS with a development CA and certificate (`llmops tls dev-cert`)"


def https_settings(on: bool) -> dict:
    """The `serve:` overrides of `--tls`: with `on`, a development CA and certificate in a
    scratch folder, so the platform is measured over HTTPS."""
    from serve_apps.tls import dev_cert

    return {"tls": dev_cert(Path(tempfile.mkdtemp(prefix="bench-tls-")), [])} if on else {}


def register_untrained(settings: Settings, registry) -> None:
    """Every task's configured architecture, untrained, as `@champion` (speed only)."""
    import torch

    from training.job import make_spec, register_model_dir
    from training.models import build_model
    from training.taskdata import build_task_data

    torch.manual_seed(0)  # the same untrained weights, so the same share of posts gets rewritten
    for task in ("support-router", "moderation", "rewriter", "support-reply"):
        tc = settings.training.tasks[task]
        settings.training.tasks[task] = tc.model_copy(update={"holdouts": ["base"],
                                                              "holdout_size": 16})
        data = build_task_data(settings.training, task)
        spec = make_spec(settings.training, registry, task, data)
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{task}-"))
        build_model(spec.model, spec.kind, spec.labels, spec.tokenizer).save_pretrained(folder)
        spec.tokenizer.save_pretrained(folder)
        register_model_dir(settings.training, registry, task, data, folder, spec.labels,
                           history=[], ds_config={}, started=time.perf_counter())


def platform(data_dir: str | None, overrides: dict | None = None, versions: int = 1):
    """(settings, registry) on `data_dir` with `overrides`; without a data dir, a scratch one
    with `versions` untrained versions of every model."""
    from training.registry import Registry

    runtime.apply_platform_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    settings = load_settings(overrides={**(overrides or {}),
                                        "data_dir": data_dir or tempfile.mkdtemp()})
    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    for _ in range(0 if data_dir else versions):
        register_untrained(settings, registry)
    return settings, registry


def report(parser: argparse.ArgumentParser,
           measure: Callable[[Settings, argparse.Namespace], dict]) -> None:
    """An offline benchmark's main: `parser` gains `--data-dir`, `--config` and `--json`; what
    libraries print goes to stderr, the report of `measure(settings, args)` alone to stdout."""
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report_to, sys.stdout = sys.stdout, sys.stderr
    settings = load_settings(args.config, overrides={"data_dir": args.data_dir}
                             if args.data_dir else None)
    print(json.dumps(measure(settings, args), indent=None if args.json else 2), file=report_to)


def sample_texts(seed: int) -> dict[str, list[str]]:
    """256 base-scenario texts per pipeline."""
    return {name: list(generate(ds, "base", 256, seed=seed).text)
            for name, (ds, _, _) in PIPELINES.items()}


def start_ray(settings: Settings):
    """A local Ray head on every core (loopback only, dashboard on), and its Serve cluster."""
    import ray

    from serve_apps.deploy import ServeCluster

    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
                   _node_ip_address=settings.ray.node_ip_address, log_to_driver=False,
                   runtime_env={"env_vars": dict(runtime.PLATFORM_ENV)})
    return ServeCluster(ctx.dashboard_url)


def ray_processes() -> dict[int, str]:
    """pid -> title of every process of the local Ray instance (GCS, raylet, workers...)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = p.info["cmdline"] or []
        head = " ".join(cmd[:2])
        if "ray" in head or "gcs_server" in head or "raylet" in head:
            found[p.pid] = (cmd[0] if cmd[0].startswith("ray::") else
                            " ".join(cmd[1:3]) if "python" in cmd[0] else p.info["name"])
    return found


def component(title: str) -> str:
    """What a Ray process is, from its title: `support/Classifier` for a replica (whatever task
    it runs now), `proxy`, an actor's class, `ray` for the rest (GCS, raylet, dashboard, idle
    workers)."""
    if title.startswith("ray::ServeReplica:"):
        return "/".join(title.split(":")[-2:]).split(".")[0]
    if title.startswith("ray::") and not title.startswith("ray::IDLE"):
        name = title[5:].split(".")[0]
        return "proxy" if name == "ProxyActor" else name
    return "ray"


class CpuMeter:
    """CPU seconds (user + system) of every process of the local Ray instance, of this one
    (the load generator) and of the `extra` ones (pid -> component) over a `with` block, by
    component: where a request's CPU goes."""

    def __init__(self, extra: dict[int, str] | None = None):
        self.named = {os.getpid(): "load generator", **(extra or {})}

    def __enter__(self) -> CpuMeter:
        self.start, self.titles = self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.end, titles = self._snapshot()
        self.titles.update(titles)

    def _snapshot(self) -> tuple[dict[int, float], dict[int, str]]:
        import psutil

        titles = {**ray_processes(), **self.named}
        seconds = {}
        for pid in titles:
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            seconds[pid] = t.user + t.system
        return seconds, titles

    def per_request_ms(self, requests: int) -> dict[str, float]:
        """Milliseconds of CPU per request by component, and their `total`."""
        out: dict[str, float] = {}
        for pid, end in self.end.items():
            used = end - self.start.get(pid, 0.0)
            name = self.named.get(pid) or component(self.titles[pid])
            out[name] = out.get(name, 0.0) + used
        out = {k: round(v * 1000 / max(requests, 1), 2)
               for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
        out["total"] = round(sum(out.values()), 2)
        return out


def models_of(data_dir: str | None) -> str:
    return "trained champions" if data_dir else "configured architectures, untrained"


# where a sampled stack spends its time: the first stage whose files a frame is in, leaf first
# (py-spy names a frame's file relative to its `sys.path` entry)
STAGES = (("model forward", ("torch/", "transformers/", "tokenizers/", "training/models.py")),
          ("log and features", ("serve_apps/inference_log.py", "monitoring/log.py",
                                "training/features.py", "pyarrow/")),
          ("guardrails", ("serve_apps/guardrails.py", "serve_apps/normalize.py",
                          "serve_apps/pii.py")),
          ("policies", ("serve_apps/policies.py", "serve_apps/call.py", "serve_apps/auth.py",
                        "serve_apps/quota.py", "monitoring/audit.py", "monitoring/batching.py",
                        "jwt/")),
          ("http and schemas", ("pydantic", "fastapi/", "starlette/", "uvicorn/",
                                "serve_apps/http.py", "json/")),
          ("pipeline", ("serve_apps/", "peers.py")),
          ("serve and ray", ("ray/",)),
          ("asyncio", ("asyncio/",)))


class Profile:
    """py-spy samples of the processes `pids` (pid -> component) over a `with` block (every
    thread that runs, 100 a second): per component, the share of its CPU samples in each of
    `STAGES` (`other`: asyncio and the rest)."""

    def __init__(self, pids: dict[int, str], seconds: float):
        import shutil

        self.pids, self.seconds = pids, max(1, int(seconds))
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))

    def __enter__(self) -> Profile:
        import subprocess

        self.folder = Path(tempfile.mkdtemp(prefix="profile-"))
        self.procs = {pid: subprocess.Popen(
            [self.spy, "record", "-p", str(pid), "-d", str(self.seconds), "-r", "100", "-f", "raw",
             "--nonblocking", "-o", str(self.folder / f"{pid}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in self.pids}
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            proc.wait()

    @staticmethod
    def stage(stack: str) -> str:
        for frame in reversed(stack.split(";")):
            path = frame[frame.rfind("(") + 1:]
            for name, marks in STAGES:
                if path.startswith(marks):
                    return name
        return "other"

    def shares(self) -> dict[str, dict[str, float]]:
        counts: dict[str, dict[str, int]] = {}
        for pid, component in self.pids.items():
            path = self.folder / f"{pid}.txt"
            if not path.exists():
                continue
            mine = counts.setdefault(component, {})
            for line in path.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if stack and n.isdigit():
                    mine[self.stage(stack)] = mine.get(self.stage(stack), 0) + int(n)
        return {c: {s: round(n / sum(mine.values()), 3) for s, n in
                    sorted(mine.items(), key=lambda kv: -kv[1])}
                for c, mine in counts.items() if mine}


async def swap_under_load(url: str, body: Callable[[int], dict], version_of: Callable[[dict], str],
                          callers: int, phase: float, swap: Callable[[], dict], new: str,
                          verify=True) -> dict:
    """`callers` closed-loop HTTP clients POST `body(i)` to `url` for `phase` seconds, while
    `swap()` runs (in a thread), and `phase` seconds after it returned. Reported: requests,
    failed ones (not 200, or cut off), p99 before / during / after the swap, its seconds, when
    the first answer by version `new` (`version_of` an answer) arrived after the swap began and
    after it returned, and answers by another version after it returned; `result`: what
    `swap()` returned."""
    import asyncio

    import httpx
    import numpy as np

    log: list[tuple] = []  # (start, end, status, version)
    stop = asyncio.Event()

    async def caller(k: int) -> None:
        async with httpx.AsyncClient(timeout=60, verify=verify) as client:
            i = k
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    r = await client.post(url, json=body(i))
                    version = version_of(r.json()) if r.status_code == 200 else None
                    log.append((started, time.perf_counter(), r.status_code, version))
                except Exception as exc:  # a failed request is what this counts
                    log.append((started, time.perf_counter(), type(exc).__name__, None))
                i += callers

    def p99(rows: list[tuple]) -> float | None:
        return round(float(np.percentile([e - s for s, e, *_ in rows], 99)) * 1000, 1) \
            if rows else None

    load = asyncio.gather(*(caller(k) for k in range(callers)))
    await asyncio.sleep(phase)
    begun = time.perf_counter()
    result = await asyncio.to_thread(swap)
    returned = time.perf_counter()
    await asyncio.sleep(phase)
    stop.set()
    await load
    before = [r for r in log if r[1] < begun]
    during = [r for r in log if r[0] < returned and r[1] >= begun]
    after = [r for r in log if r[0] >= returned]
    first = min((e for _, e, _, v in log if v == new), default=None)
    sent_new = min((s for s, _, _, v in log if v == new), default=None)
    sent_old = max((s for s, _, _, v in log if v is not None and v != new), default=None)
    return {"requests": len(log), "failed": sum(1 for r in log if r[2] != 200),
            "requests_during": len(during),
            "p99_ms": {"before": p99(before), "during": p99(during), "after": p99(after)},
            "swap_command_s": round(returned - begun, 2),
            "first_new_answer_after_begin_s": round(first - begun, 2) if first else None,
            "first_new_answer_after_return_s": round(first - returned, 2) if first else None,
            # when the switch happened as callers saw it: the first request the new version
            # answered, and the last the old one did, by when they were sent (from the begin)
            "first_new_request_sent_s": round(sent_new - begun, 2) if sent_new else None,
            "last_old_request_sent_s": round(sent_old - begun, 2) if sent_old else None,
            "old_answers_after_return": sum(1 for r in after if r[3] != new),
            "versions_seen": sorted({r[3] for r in log if r[3]}), "result": result}
