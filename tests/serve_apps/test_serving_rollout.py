"""Changing what the stack serves (serving_stack.py) without failing a request: a hot swap under
load, a sticky canary split and a shadow, new class priors without a restart, the GPU rule of
`serve-config`, and the CLI's status, swap and refusals."""

import json
import threading
import time
from collections.abc import Callable

import httpx
import yaml
from conftest import (
    running,
    wait_for,
)
from ray import serve
from serving_stack import (
    MODEL,
    llmops,
)

from monitoring.log import read
from serve_apps.batch import Item
from serve_apps.deploy import set_canary, set_priors, swap
from serve_apps.model_config import CanaryConfig
from serve_apps.slot import bucket


def _load(platform, stop: threading.Event, log: list) -> Callable[[], None]:
    """One client's moderation requests until `stop`, each logged (when, status, version)."""
    url = platform.url

    def run() -> None:
        with httpx.Client(timeout=30, headers=platform.auth) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{url}/v1/moderate", json={"text": "you are all idiots"})
                    version = (r.json()["results"][0]["models"]["classifier"]["version"]
                               if r.status_code == 200 else None)
                    log.append((started, r.status_code, version))
                except httpx.HTTPError as exc:
                    log.append((started, type(exc).__name__, None))

    return run


def test_hot_swap_under_load_fails_no_request(platform):
    log: list = []
    stop = threading.Event()
    with running(stop, *[_load(platform, stop, log)] * 6):  # six clients
        wait_for("traffic before the swap", lambda: len(log) >= 150, every_s=0.05)
        result = swap(platform.cluster, "moderation", platform.registry.tracking_uri, version=2)
        swapped_at = time.monotonic()
        wait_for("traffic after the swap", lambda: len(log) >= 500 and sum(
            1 for t, *_ in log if t > swapped_at) >= 100, every_s=0.05)
    assert result["deployments"] == ["moderation/Classifier"]
    assert [s for _, s, _ in log if s != 200] == []
    assert {v for *_, v in log} == {"1", "2"}
    assert {v for t, _, v in log if t > swapped_at} == {"2"}  # every replica switched
    swap(platform.cluster, "moderation", platform.registry.tracking_uri, alias="champion")
    status = platform.cluster.status()["moderation"]["deployments"]["Classifier"]
    assert (status["model"], status["alias"]) == ("models:/moderation/1", "champion")


def test_canary_split_is_sticky_and_shadow_answers_with_champion(platform):
    uri = platform.registry.tracking_uri
    set_canary(platform.cluster, "moderation", uri,
               CanaryConfig(model="models:/moderation@challenger", fraction=0.3))
    handle = serve.get_deployment_handle("Classifier", "moderation")
    ids = [f"req-{i}" for i in range(300)]
    answers = [handle.predict.remote(Item("is this spam?", rid)) for rid in ids]
    variants = [a.result()["model"] for a in answers]
    for rid, model in zip(ids, variants):
        expected = "challenger" if bucket(rid) < 0.3 else "champion"
        assert model["variant"] == expected
        assert model["version"] == ("2" if expected == "challenger" else "1")
    share = sum(m["variant"] == "challenger" for m in variants) / len(ids)
    assert 0.25 < share < 0.35
    again = [handle.predict.remote(Item("other text", rid)).result()["model"]["variant"]
             for rid in ids[:50]]
    assert again == [m["variant"] for m in variants[:50]]  # sticky per request id

    set_canary(platform.cluster, "moderation", uri,
               CanaryConfig(model="models:/moderation/2", fraction=1.0, shadow=True))
    resp = serve.get_app_handle("moderation").moderate.remote({"text": "hello"}, "s-1",
                                                              platform.principal).result()
    rid = resp.request_id
    models = resp.results[0].models
    assert models["classifier"].model_dump() == MODEL
    assert (models["classifier_shadow"].version, models["classifier_shadow"].variant) == (
        "2", "shadow")
    # the shadow's answer is logged beside the champion's (a shadow canary is judged on it);
    # drift checks, retraining and feedback read only what users got
    wait_for("the shadow's answer in the log",
             lambda: len(read(platform.log_uri, request_id=rid, shadow=True)) >= 2, 20)
    both = read(platform.log_uri, request_id=rid, shadow=True)
    assert sorted(zip(both.variant, both.model_version)) == [("champion", "1"), ("shadow", "2")]
    assert list(read(platform.log_uri, request_id=rid).variant) == ["champion"]
    set_canary(platform.cluster, "moderation", uri, None)
    assert platform.cluster.status()["moderation"]["deployments"]["Classifier"]["canary"] is None


def test_new_class_priors_reach_the_served_version_without_a_restart(platform):
    """The controller's answer to a label shift: a hot user_config change that adjusts the
    posteriors of one version; the logged posterior stays the trained one (what the next
    estimate starts from)."""
    handle = serve.get_deployment_handle("Classifier", "moderation")
    labels = platform.registry.labels("moderation", "1")
    text = "thanks, see you at the meeting tomorrow"
    before = handle.predict.remote(Item(text, "p-0")).result()
    rare = min(labels, key=lambda k: before["scores"][k])
    set_priors(platform.cluster, "moderation", 1, {rare: 1e6})
    after = handle.predict.remote(Item(text, "p-1")).result()
    assert after["label"] == rare and after["scores"][rare] > 0.9
    assert after["features"]["posterior"] == before["features"]["posterior"]
    set_priors(platform.cluster, "moderation", 2, {rare: 1e6})  # another version: not v1's
    assert handle.predict.remote(Item(text, "p-2")).result()["label"] == before["label"]
    set_priors(platform.cluster, "moderation", 1, None)
    assert handle.predict.remote(Item(text, "p-3")).result()["scores"] == before["scores"]


def test_serve_config_reads_use_gpu_auto_as_up_does(platform):
    """One GPU rule: with `use_gpu: auto`, `llmops serve-config` asks the running cluster (2
    logical GPUs here) as `llmops up` does, so model replicas ask for their GPU share."""
    gpu_options = []
    for use_gpu in ("auto", "no"):
        env = {**platform.env, "LLMOPS_SERVE__USE_GPU": use_gpu}
        proc = llmops((env, platform.config), "serve-config")
        assert proc.returncode == 0, proc.stderr[-2000:]
        gpu_options.append([d["ray_actor_options"].get("num_gpus", 0)
                            for app in yaml.safe_load(proc.stdout)["applications"]
                            for d in app["deployments"] if d["name"] == "Generator"])
    assert gpu_options[0] and all(g > 0 for g in gpu_options[0])  # replicas of their own
    assert not any(gpu_options[1])


def test_cli_status_swap_and_errors(platform):
    run = (platform.env, platform.config)
    proc = llmops(run, "status", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    apps = json.loads(proc.stdout)["applications"]
    assert {a: apps[a]["status"] for a in apps} == {"moderation": "RUNNING", "support": "RUNNING",
                                                    "chat": "RUNNING", "feedback": "RUNNING"}
    assert apps["chat"]["deployments"]["Generator"]["model"] == "models:/rewriter/1"
    # chat's generator runs inside its pipeline's replica, moderation's in replicas of its own
    assert apps["chat"]["deployments"]["Generator"]["inline_in"] == "ChatPipeline"
    assert "inline_in" not in apps["moderation"]["deployments"]["Generator"]
    for args, message in [(("swap", "moderation", "--version", "99"), "not in the registry"),
                          (("swap", "nosuch", "--alias", "champion"), "not in the registry"),
                          (("canary", "moderation", "--version", "2", "--fraction", "1.5"),
                           "--fraction")]:
        proc = llmops(run, *args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
