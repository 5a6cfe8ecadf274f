"""What the serving benchmarks share: settings on a data dir (a scratch one with every task's
configured architecture registered untrained, or one holding trained champions), the texts they
send, and a local Ray head with the platform's environment and its Serve cluster."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import runtime  # noqa: E402
from cluster.settings import Settings, load_settings  # noqa: E402
from training.data import generate  # noqa: E402

# pipeline -> (dataset of its texts, HTTP path, handle method)
PIPELINES = {"support": ("support-tickets", "/v1/support/route", "route"),
             "moderation": ("moderation", "/v1/moderate", "moderate")}
UNLIMITED = {"requests_per_day": None, "tokens_per_day": None, "requests_per_second": None}


def register_untrained(settings: Settings, registry) -> None:
    """Every task's configured architecture, untrained, as `@champion` (speed only)."""
    import torch

    from training.job import build_task_data, make_spec, register_model_dir
    from training.models import build_model

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


def models_of(data_dir: str | None) -> str:
    return "trained champions" if data_dir else "configured architectures, untrained"
