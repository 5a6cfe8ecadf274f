"""The serving stack the tests/serve_apps/test_serving_*.py modules share: tiny models trained
in-process and registered in a real MLflow registry, deployed by `llmops up` on the session's
Ray (set up once, about a minute: the `platform` fixture of tests/conftest.py, whose tests run
after every other test of the session, so the stack's replicas hold no CPU another test needs).

The modules run in the order of their names, each test leaving the stack as it found it, except
where the stack's later tests build on it (they say so): the generator's breaker left open (only
support's router is needed after it), the metrics and alerts that the breaker, the health check
and the closed loop produced, and the applications deleted or replaced by the last tests."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml
from conftest import free_port, register_quick, tiny_settings, wait_for

from monitoring.config import MonitoringConfig
from monitoring.log import read
from serve_apps.auth import SCOPES
from serve_apps.config import ServeConfig
from serve_apps.deploy import ServeCluster
from serve_apps.model import load
from training.data import generate
from training.registry import Registry

MODEL = {"name": "moderation", "version": "1", "alias": "champion", "variant": "champion"}


ONE_REPLICA = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}


SUPPORT_TEXTS = list(generate("support-tickets", "base", 6, seed=3).text)


@dataclass
class Platform:
    url: str
    config: Path
    env: dict
    registry: Registry
    cluster: ServeCluster
    reply_threshold: float
    log_uri: str
    auth: dict          # the Authorization header of tenant `tests`, every scope
    principal: dict     # what a handle caller states
    replier: object     # support's generator (inline in its pipeline), loaded here

    def headers(self, **more: str) -> dict:
        return {**self.auth, **{k.replace("_", "-"): v for k, v in more.items()}}


def llmops(platform_or_env, *args) -> subprocess.CompletedProcess:
    env, config = platform_or_env
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env=env)


def llmops_here(platform_or_env, *args) -> subprocess.CompletedProcess:
    """`llmops` in this process, for commands that start no Ray (traffic, drift checks, the
    health check, one monitor round): the same parsing, output and exit code, without a
    Python start and its imports per command."""
    from cluster.cli import main

    env, config = platform_or_env
    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*args, "--config", str(config)])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# every support request generates a reply: short ones keep the tests' traffic quick
REPLY_TOKENS = 24


def _split_threshold(model) -> float:
    """A `min_reply_confidence` that sends some of SUPPORT_TEXTS down each path (generated reply,
    retrieved reply): the middle of the widest gap between the generator's confidences."""
    confidences = sorted(o["confidence"] for o in model.generate(SUPPORT_TEXTS, REPLY_TOKENS,
                                                                 0.0, 0, []))
    low, high = max(zip(confidences, confidences[1:]), key=lambda pair: pair[1] - pair[0])
    assert high - low > 1e-3, confidences
    return (low + high) / 2


def _settings(state: Path, port: int):
    settings = tiny_settings(state)
    tasks = dict(settings.training.tasks)
    moderation = tasks["moderation"]
    tasks["support-router"] = tasks["support-router"].model_copy(update={"holdout_size": 300})
    tasks["moderation"] = moderation.model_copy(update={  # ~0.93 macro-F1 in 5 s
        "train_size": 800, "label_priors": {"safe": 0.3, "toxic": 0.3, "spam": 0.2, "pii": 0.2},
        "model": moderation.model.model_copy(update={"architecture": {
            "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 128}})})
    settings.training.tasks = tasks
    settings.monitoring = MonitoringConfig.model_validate({
        "log": {"flush_interval_s": 0.5},
        # 250-request windows, 200 at least: clean ones stay well inside every threshold
        # (confidence drift 0.16 of 0.3 at most, measured on this suite's router)
        "drift": {"k": 1, "n": 1, "window": 250},
        "monitor": {"port": free_port()}})  # `llmops up` starts it (test_monitor_...)
    # moderation's models have replicas of their own; support's router and encoder run inline
    # (`auto`), its generator in a replica of its own (`auto`); chat's generator inline
    # this tiny moderation model is unsure of most toxic posts at any error rate that covers
    # its labels: abstention is off here (held posts: tests/serve_apps/test_deployments.py)
    classifier = {"model": "models:/moderation@champion", **ONE_REPLICA, "placement": "replica",
                  "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
                  "error_rate": None}
    settings.serve = ServeConfig.model_validate({
        "port": port, "use_gpu": "no",
        # every test client shares 127.0.0.1: the per-address refusal limit is tested apart
        "limits": {"refusal_burst": 100_000},
        "quota": {"tenants": {"tests": {"requests_per_second": None},
                              "small": {"requests_per_day": 3}}},
        "moderation": {"classifier": classifier, "generator": {
            "model": "models:/rewriter@champion", **ONE_REPLICA, "placement": "replica"}},
        # the router abstains often (half the calibration rows' true labels are outside its
        # sets): both answers are tested
        "support": {"classifier": {"model": "models:/support-router@champion",
                                   "error_rate": 0.5},
                    "encoder": {"model": "all-MiniLM-L6-v2"},
                    "generator": {"model": "models:/support-reply@champion",
                                  "generation": {"max_new_tokens": REPLY_TOKENS,
                                                 "stop": []}}},
        "chat": {"generator": {"model": "models:/rewriter@champion", "placement": "inline"}},
        "advisor": {"enabled": False}})  # tests/serve_apps/test_advisor.py
    return settings


def up(ray_session, tmp_path_factory):
    """`llmops up` of the stack, yielded as a `Platform`; then `llmops down` (the `platform`
    fixture of tests/conftest.py)."""
    root = tmp_path_factory.mktemp("serving")
    port = free_port()
    settings = _settings(root / "state", port)
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, "moderation", epochs=10, lr=1e-3)
    register_quick(settings, registry, "moderation", epochs=10, lr=1e-3, seed=1)
    register_quick(settings, registry, "rewriter")
    register_quick(settings, registry, "support-router")
    register_quick(settings, registry, "support-reply")
    replier = load("models:/support-reply@champion", registry.tracking_uri)
    threshold = _split_threshold(replier)
    settings.serve.support.min_reply_confidence = threshold
    config = root / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {**os.environ, "LLMOPS_RAY__ADDRESS": ray_session.address,
           "LLMOPS_RAY__DASHBOARD_PORT": ray_session.dashboard.rsplit(":", 1)[1]}
    proc = llmops((env, config), "up", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    up = json.loads(proc.stdout)
    assert up["started_ray"] is False  # it joined the running cluster
    assert up["monitor"]["running"], up["monitor"]
    assert yaml.safe_load(Path(up["serve_config"]).read_text())["applications"]
    token = llmops_here((env, config), "token", "create", "--tenant", "tests", "--scopes",
                         "moderate", "support", "chat", "feedback", "admin", "--json")
    assert token.returncode == 0, token.stderr[-2000:]
    yield Platform(f"http://127.0.0.1:{port}", config, env, registry,
                   ServeCluster(ray_session.dashboard), threshold, settings.log_uri,
                   {"Authorization": f"Bearer {json.loads(token.stdout)['token']}"},
                   {"subject": "test-suite", "tenant": "tests", "scopes": list(SCOPES)}, replier)
    down = llmops((env, config), "down", "--json")
    assert down.returncode == 0, down.stderr[-2000:]
    assert json.loads(down.stdout)["monitor_stopped"] is True
    assert not ServeCluster(ray_session.dashboard).details()["applications"]


def logged(platform, ids: set[str], timeout: float = 20) -> pd.DataFrame:
    """The log records of `ids`, once the replicas' periodic flush has written them all."""
    def mine() -> pd.DataFrame:
        log = read(platform.log_uri)
        return log[log.request_id.isin(ids)]

    wait_for(f"{len(ids)} requests in the log", lambda: set(mine().request_id) == ids, timeout)
    return mine()


def flushed(platform, since: datetime, n: int, **equals: str) -> None:
    """Until the log holds `n` requests (of `equals`) made since `since`: the replicas flush
    their buffers every 0.5 s."""
    wait_for(f"{n} requests in the log", lambda: read(
        platform.log_uri, since=since, **equals).request_id.nunique() >= n, 30)


def replica_ids(platform, apps: tuple[str, ...]) -> set[tuple[str, str, str]]:
    """Every replica of `apps` as (application, deployment, replica id): unchanged across a
    deploy that changed settings in place."""
    return {(app, dep, r["replica_id"])
            for app, a in platform.cluster.details()["applications"].items() if app in apps
            for dep, d in a["deployments"].items() for r in d["replicas"]}
