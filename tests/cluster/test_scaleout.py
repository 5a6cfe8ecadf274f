"""Scale-out artefacts checked without a cloud: `cluster.yaml` against Ray's own schema and the
platform's resource requests, the KubeRay manifests against their sources, the Dockerfile lint."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from cluster.capacity import Unplaceable, check, load_cluster_config, placements
from cluster.manifests import rayservice, serve_config_of, write_all
from cluster.settings import load_settings
from serve_apps.config import TlsConfig
from training.errors import LLMOpsError

CLUSTER_YAML = ROOT / "cluster.yaml"
CLUSTER_SETTINGS = ROOT / "cluster" / "config" / "llmops.yaml"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return load_cluster_config(CLUSTER_YAML)


@pytest.fixture(scope="module")
def cluster_settings():
    return load_settings(CLUSTER_SETTINGS, environ={})


def test_cluster_yaml_passes_rays_own_validation(cluster_config):
    """What `ray up` does before it talks to AWS: fill the provider's defaults, then validate
    against ray-schema.json of the pinned Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "ray.head.default"
    assert types["ray.head.default"]["resources"].get("GPU", 0) == 0
    gpu_types = {n for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types == {"serve-gpu", "train-gpu"}
    assert all(types[n]["min_workers"] == 0 for n in gpu_types)  # scale to zero
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--metrics-export-port=8080" in start
    # the dashboard and its Job API on the head's loopback (reached through `ray dashboard`'s
    # SSH tunnel); MLflow only with a password; from outside only SSH and Serve's port
    assert "--dashboard-host=127.0.0.1" in start and "--app-name basic-auth" in start
    opened = prepared["provider"]["security_group"]["IpPermissions"]
    assert sorted(p["FromPort"] for p in opened) == [22, 8000]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in opened for r in p["IpRanges"])

    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["serve-gpu"]["min_workers"] = "none"
    with pytest.raises(Exception, match="none"):
        validate_config(prepare_config(broken))


def test_every_request_fits_the_intended_node_type(cluster_config, cluster_settings):
    rows = {r["who"]: r for r in check(cluster_settings, cluster_config)}
    models = [r for who, r in rows.items() if who.startswith("serve ") and "GPU" in r["resources"]]
    assert len(models) == 7  # every model deployment asks for a GPU share ...
    assert all(r["node_types"] == ["serve-gpu"] for r in models)  # ... of the serving type only
    assert rows["train worker"]["node_types"] == ["train-gpu"]
    assert rows["train worker"]["resources"]["train_gpu"] == 1
    ingresses = [r for who, r in rows.items() if who.endswith(("Pipeline", "Service"))]
    assert ingresses and all("ray.head.default" in r["node_types"] for r in ingresses)

    # Without the custom resources a replica could land on (and keep awake) the training node.
    plain = cluster_settings.model_copy(deep=True)
    plain.serve.gpu_resource = None
    loose = {r["who"]: r for r in placements(plain, cluster_config)}
    assert loose["serve chat/Generator"]["node_types"] == ["serve-gpu", "train-gpu"]


def test_a_request_no_node_type_can_hold_is_named(cluster_config, cluster_settings):
    greedy = cluster_settings.model_copy(deep=True)
    greedy.serve.chat.generator.resources.num_gpus = 2  # serve-gpu nodes have one
    greedy.training.workers = 9                         # 2 train nodes x 4 GPUs
    with pytest.raises(Unplaceable) as err:
        check(greedy, cluster_config)
    assert "chat/Generator" in str(err.value) and "train worker" in str(err.value)
    assert "moderation" not in str(err.value)


def test_cluster_check_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "cluster.cli", "cluster", "check", "--config",
                         str(CLUSTER_SETTINGS), "--cluster-config", str(CLUSTER_YAML), "--json"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "small.yaml"
    config = load_cluster_config(CLUSTER_YAML)
    del config["available_node_types"]["train-gpu"]
    bad.write_text(yaml.safe_dump(config))
    failed = subprocess.run([sys.executable, "-m", "cluster.cli", "cluster", "check", "--config",
                             str(CLUSTER_SETTINGS), "--cluster-config", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode != 0
    assert failed.stderr.startswith("llmops: error: no node type can hold: train worker")
    assert "Traceback" not in failed.stderr


def test_kuberay_manifests_agree_with_their_sources(tmp_path, cluster_config, cluster_settings):
    """The committed manifests are what `llmops kuberay` writes now, and what they say agrees
    with the serve config `llmops up` deploys and with cluster.yaml's node types."""
    from ray.serve.schema import ServeDeploySchema

    committed = ROOT / "cluster" / "kuberay"
    for path in write_all(CLUSTER_SETTINGS, CLUSTER_YAML, tmp_path):
        assert (committed / path.name).read_text() == path.read_text(), \
            f"{path.name} is stale: run `make manifests`"

    docs = list(yaml.safe_load_all((committed / "rayservice.yaml").read_text()))
    settings_map, _, service, ray_policy, mlflow_policy = docs
    # Nothing reaches the dashboard / Job API, GCS or MLflow but whom the policies name
    ingress = ray_policy["spec"]["ingress"]
    open_to_all = [rule["ports"] for rule in ingress if "from" not in rule]
    assert open_to_all == [[{"protocol": "TCP", "port": 8000}]]
    dashboard = [rule for rule in ingress if {"protocol": "TCP", "port": 8265} in
                 rule.get("ports", [])]
    assert [r["from"][0]["namespaceSelector"] for r in dashboard] == [
        {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}]
    assert mlflow_policy["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}],
        "ports": [{"protocol": "TCP", "port": 5000}]}]
    assert yaml.safe_load(settings_map["data"]["llmops.yaml"]) == \
        yaml.safe_load(CLUSTER_SETTINGS.read_text())
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    assert serve == serve_config_of(cluster_settings, cluster_config)
    names = {a["name"] for a in serve["applications"]}
    assert names == {"moderation", "support", "chat", "feedback", "advisor"}

    ray_cluster = service["spec"]["rayClusterConfig"]
    assert ray_cluster["enableInTreeAutoscaling"] is True
    assert ray_cluster["autoscalerOptions"]["idleTimeoutSeconds"] == \
        cluster_config["idle_timeout_minutes"] * 60
    groups = {g["groupName"]: g for g in ray_cluster["workerGroupSpecs"]}
    types = cluster_config["available_node_types"]
    assert set(groups) == set(types) - {cluster_config["head_node_type"]}
    for name, group in groups.items():
        resources = types[name]["resources"]
        assert (group["minReplicas"], group["maxReplicas"]) == \
            (types[name]["min_workers"], types[name]["max_workers"])
        params = group["rayStartParams"]
        assert int(params["num-gpus"]) == resources["GPU"]
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        assert (yaml.safe_load(yaml.safe_load(params["resources"])) if custom else {}) == custom
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) == resources["GPU"]
        assert container["image"].endswith("-cuda" if resources["GPU"] else "-cpu")

    job = yaml.safe_load((committed / "rayjob-support-router.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"] == "llmops train support-router"
    assert [g["groupName"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == \
        ["train-gpu"]


def test_https_settings_mount_the_tls_secret_on_the_head_only(cluster_config, cluster_settings):
    """With serve.tls the proxy's HTTP options name the files and the head pod (where the proxy
    runs) mounts the Secret llmops-tls at their folder; files in two folders are refused."""
    from ray.serve.schema import ServeDeploySchema

    tls = {"certfile": "/home/ray/tls/server.pem", "keyfile": "/home/ray/tls/server-key.pem"}
    settings = cluster_settings.model_copy(deep=True)
    settings.serve.tls = TlsConfig.model_validate(tls)
    service = rayservice(settings, "", cluster_config)[2]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000, "ssl_certfile": tls[
        "certfile"], "ssl_keyfile": tls["keyfile"]}
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "tls", "mountPath": "/home/ray/tls", "readOnly": True} in \
        head["containers"][0]["volumeMounts"]
    assert [v["secret"]["secretName"] for v in head["volumes"] if v["name"] == "tls"] == \
        ["llmops-tls"]
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert all(v["name"] != "tls" for v in group["template"]["spec"]["volumes"])
    settings.serve.tls = TlsConfig.model_validate({**tls, "ca_certs": "/etc/ssl/ca.pem"})
    with pytest.raises(LLMOpsError, match="same folder"):
        rayservice(settings, "", cluster_config)
    settings.serve.tls = TlsConfig(certfile="/home/ray/secrets/s.pem",
                                   keyfile="/home/ray/secrets/k.pem")
    with pytest.raises(LLMOpsError, match="another volume"):
        rayservice(settings, "", cluster_config)


def test_dockerfile_lints_clean():
    import shutil

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    done = subprocess.run([hadolint, str(ROOT / "cluster" / "Dockerfile")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "ARG RAY_VERSION=2.60.0" in text  # the pinned Ray's image
    assert "://" not in "".join(line for line in text.splitlines() if not line.startswith("#")), \
        "the image names no index host: pip's own configuration decides"
