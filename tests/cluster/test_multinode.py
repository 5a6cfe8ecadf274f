"""Several Ray nodes on one machine, as Ray tests itself: `ray.cluster_utils.Cluster` for
placement, multi-node training and the loss of a node under load, and Ray's fake multi-node
provider for the autoscaler (GPU nodes launched on demand, terminated when idle).

Each test runs its own Ray (the session's is stopped first, so these run last: conftest.py), in
a private RAY_TMPDIR, and stops only the processes it started.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, free_port, register_quick, tiny_settings, wait_for

from cluster.capacity import load_cluster_config
from cluster.runtime import PLATFORM_ENV

pytestmark = pytest.mark.own_ray
# Fast failure detection, as Ray's own tests use: a dead node is noticed in about 3 s.
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
               "health_check_failure_threshold": 3}



@pytest.fixture
def private_ray_tmp(monkeypatch):
    """A RAY_TMPDIR of this test's own (Ray's default /tmp/ray breaks Cluster), short enough
    for Ray's socket paths; the session's Ray, if any, is stopped first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    folder = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _replica_nodes(cluster, app: str) -> dict[str, set[str]]:
    """Deployment -> node ids of its RUNNING replicas."""
    deps = cluster.details()["applications"].get(app, {}).get("deployments", {})
    return {name: {r["node_id"] for r in d.get("replicas", []) if r["state"] == "RUNNING"}
            for name, d in deps.items()}


def test_placement_training_spread_and_node_loss_under_load(private_ray_tmp, tmp_path):
    """A head, two CPU nodes and a GPU node (logical GPUs plus the serving node type's
    `serve_gpu` resource), as cluster.yaml lays them out."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from monitoring import audit
    from serve_apps.deploy import ServeCluster, serve_config
    from training.job import fit_and_register
    from training.registry import Registry
    from training.taskdata import build_task_data

    settings = tiny_settings(tmp_path / "state")
    registry = Registry(settings.registry, settings.data_dir)
    dashboard, http_port = free_port(), free_port()
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard, "_system_config": FAST_HEALTH})
    try:
        head = ray.get_runtime_context().get_node_id()
        cpu_nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()

        # A fine-tune whose two DeepSpeed ranks cannot share a node: one on each CPU node,
        # talking gloo across them, checkpoints in the shared storage path.
        data = build_task_data(settings.training, "moderation")
        result = fit_and_register(settings.training, registry, "moderation", data,
                                  storage_path=settings.storage_path, use_gpu=False)
        assert result.version == 1
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                              limit=100)
        assert {w.node_id for w in workers} == {n.node_id for n in cpu_nodes}

        register_quick(settings, registry, "rewriter")
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=2, resources={"serve_gpu": 2})
        cluster.wait_for_nodes()
        serve = settings.serve.model_copy(deep=True)
        serve.port, serve.gpu_resource = http_port, "serve_gpu"
        serve.moderation.policies = ["audit"]
        for md in (serve.moderation.classifier, serve.moderation.generator):
            md.autoscaling.min_replicas = md.autoscaling.max_replicas = 1
            md.resources.num_cpus = 0.5  # the two fill the GPU node: the ingress goes elsewhere
        serve.support.enabled = serve.chat.enabled = serve.advisor.enabled = False
        config = serve_config(serve, registry.tracking_uri, True, dict(PLATFORM_ENV), None,
                              settings.governance())
        for app in config["applications"]:
            for dep in app["deployments"]:
                dep["health_check_period_s"] = 1
                dep["health_check_timeout_s"] = 2
        apps = ServeCluster(f"127.0.0.1:{dashboard}")
        apps.deploy(config, timeout_s=180)

        placed = _replica_nodes(apps, "moderation")
        assert placed["Classifier"] == placed["Generator"] == {gpu_node.node_id}
        assert placed["ModerationPipeline"] <= {n.node_id for n in cpu_nodes}

        # Load from four clients; each retries a failed request (a 5xx or a cut connection)
        # up to 5 times, 0.5 s apart: the documented client policy during a node loss.
        url = f"http://127.0.0.1:{http_port}/v1/moderate"
        stop, outcomes = threading.Event(), []

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as http:
                i = 0
                while not stop.is_set():
                    text = f"post {k}-{i}: you are an idiot" if i % 2 else f"post {k}-{i}: hello"
                    attempts, status = 0, None
                    while attempts < 6:
                        attempts += 1
                        try:
                            status = http.post(url, json={"text": text}).status_code
                        except httpx.TransportError:
                            status = None
                        if status == 200:
                            break
                        time.sleep(0.5)
                    outcomes.append((status, attempts))
                    i += 1

        with futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, k) for k in range(4)]
            wait_for("traffic", lambda: len(outcomes) >= 20, 60)
            cluster.remove_node(gpu_node, allow_graceful=False)
            lost_at = time.monotonic()
            time.sleep(2)
            fresh = cluster.add_node(num_cpus=1, num_gpus=2, resources={"serve_gpu": 2})
            wait_for("replicas on the new GPU node",
                     lambda: _replica_nodes(apps, "moderation").get("Classifier") == {fresh.node_id}
                     and _replica_nodes(apps, "moderation").get("Generator") == {fresh.node_id},
                     120)
            apps.wait(config, timeout_s=60)
            recovered_s = time.monotonic() - lost_at
            before = len(outcomes)
            wait_for("traffic after recovery", lambda: len(outcomes) >= before + 20, 60)
            stop.set()
            for c in clients:
                c.result()

        failed = [o for o in outcomes if o[0] != 200]
        retried = [o for o in outcomes if o[1] > 1]
        print(f"node loss: {len(outcomes)} requests, {len(retried)} retried, {len(failed)} "
              f"failed, replicas back in {recovered_s:.1f} s")
        assert not failed, f"requests that failed after every retry: {failed[:5]}"
        assert recovered_s < 120

        # The audit logger, pinned to the head, kept every answer in one unbroken chain.
        logger = list_actors(filters=[("class_name", "=", "AuditLogger"), ("state", "=", "ALIVE")],
                             detail=True)
        assert [a.node_id for a in logger] == [head]
        verified = audit.verify(settings.audit_dir)
        assert verified.ok and verified.records >= len(outcomes)
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def fake_autoscaling_config(cluster_config: dict, gcs_port: int, idle_minutes: float) -> dict:
    """cluster.yaml's node types for Ray's fake multi-node provider (autoscaler v1): the same
    names, GPUs and custom resources, at most 2 logical CPUs (the machine has 2 cores) and 2
    nodes of a type. v1 fills no
    defaults, so every field it reads is given."""
    types = {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {},
                                  "max_workers": 0}}
    for name, t in cluster_config["available_node_types"].items():
        if name == cluster_config["head_node_type"]:
            continue
        resources = {**t["resources"], "CPU": min(t["resources"].get("CPU", 1), 2)}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                       "max_workers": min(t.get("max_workers", 1), 2)}
    return {
        "cluster_name": "fake-llmops", "max_workers": 4, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": types, "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        "cluster_synced_files": [], "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _kill_session(sid: int) -> None:
    """Stop every process of the Ray this test started (its own session), nothing else."""
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _nodes_by_type() -> dict[str, int]:
    import ray

    counts: dict[str, int] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        r = node["Resources"]
        kind = "serve-gpu" if "serve_gpu" in r else "train-gpu" if "train_gpu" in r else \
            "head" if "node:__internal_head__" in r else "cpu"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def test_fake_autoscaler_launches_gpu_nodes_on_demand_and_removes_idle_ones(private_ray_tmp,
                                                                             tmp_path):
    """cluster.yaml's node types under Ray's autoscaler: a GPU replica (the platform's own
    placement options) brings up a serving GPU node, a fine-tune's workers a training node;
    once they are gone the nodes are terminated after the idle timeout."""
    import ray
    from ray import serve

    from serve_apps.apps import actor_resources
    from serve_apps.model_config import ModelDeploymentConfig
    from training.config import TrainingConfig

    config = fake_autoscaling_config(load_cluster_config(ROOT / "cluster.yaml"), free_port(),
                                     idle_minutes=0.1)
    config_file = tmp_path / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = int(config["provider"]["gcs_address"].rsplit(":", 1)[1])
    env = {**os.environ, **PLATFORM_ENV, "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "0",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    start = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
         f"--autoscaling-config={config_file}", "--include-dashboard=false",
         "--disable-usage-stats"], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = start.pid  # the session every Ray process of this test inherits
    logs = Path(private_ray_tmp) / "session_latest" / "logs"

    def monitor_log() -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in logs.glob("monitor.*")
                         if p.is_file())

    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, out[-2000:]
        ray.init(address=f"127.0.0.1:{port}", runtime_env={"env_vars": dict(PLATFORM_ENV)})
        assert _nodes_by_type() == {"head": 1}

        # Serving: one replica asking for a GPU share the way the platform's deployments do.
        md = ModelDeploymentConfig(model="all-MiniLM-L6-v2")
        options = actor_resources(md, use_gpu=True, gpu_resource="serve_gpu")
        assert options["resources"] == {"serve_gpu": 0.25}

        @serve.deployment(ray_actor_options=options, health_check_period_s=1)
        class Probe:
            def __call__(self) -> str:
                return ray.get_runtime_context().get_node_id()

        # one HTTP proxy, on the head, as the platform deploys (serve_apps/deploy.py): a proxy
        # on the GPU node would hold it for Serve's 30 s proxy draining once the replica left
        serve.start(proxy_location="HeadOnly")
        launched = time.monotonic()
        handle = serve.run(Probe.bind(), name="probe", route_prefix=None, blocking=False)
        node_id = handle.remote().result(timeout_s=120)
        up_s = time.monotonic() - launched
        assert _nodes_by_type() == {"head": 1, "serve-gpu": 1}, monitor_log()
        resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
        assert resources["serve_gpu"] == 1 and resources["GPU"] == 1

        # Training: a fine-tune's workers (the platform's request) bring up the training type.
        training = TrainingConfig(gpu_resource="train_gpu", workers=2)
        bundle = training.worker_resources(use_gpu=True)
        group = ray.util.placement_group([bundle] * training.workers)
        ray.get(group.ready(), timeout=120)
        assert _nodes_by_type() == {"head": 1, "serve-gpu": 1, "train-gpu": 1}, monitor_log()

        # Both released: the idle nodes are terminated after idle_timeout_minutes (6 s).
        serve.delete("probe")
        ray.util.remove_placement_group(group)
        released = time.monotonic()
        wait_for("idle GPU nodes to be terminated", lambda: _nodes_by_type() == {"head": 1}, 120,
                 detail=monitor_log)
        down_s = time.monotonic() - released
        print(json.dumps({"gpu_node_up_s": round(up_s, 1), "idle_nodes_down_s": round(down_s, 1)}))
        assert down_s >= config["idle_timeout_minutes"] * 60 * 0.5
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        _kill_session(sid)
