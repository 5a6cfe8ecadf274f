"""KubeRay manifests generated from the same sources as `ray up`: the node types and images of
`cluster.yaml` become the head and worker groups, the cluster settings (cluster/config/
llmops.yaml) become the ConfigMap every pod mounts, and the RayService's `serveConfigV2` is the
Serve config `llmops up` deploys (`serve_apps.deploy.serve_config`), so there is one source of
truth. `llmops kuberay` writes them; a test checks the committed copies agree.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import yaml

from cluster.capacity import Request, fitting, node_types, uses_gpu
from cluster.runtime import PLATFORM_ENV
from cluster.settings import Settings
from serve_apps.config import TlsConfig
from training.errors import LLMOpsError

RAY_VERSION = "2.60.0"
CONFIG_DIR = "/home/ray/config"       # the settings file ($LLMOPS_CONFIG of the image)
SECRETS_DIR = "/home/ray/secrets"     # the JWT secret (serve.auth.secret_file)
DATA_DIR = "/home/ray/llmops-data"     # data_dir of cluster/config/llmops.yaml
GIB_PER_CPU = 4                        # pod memory per CPU of a node type (m5 / g5 ratio)
METRICS_PORT = 8080
SERVE_PORT = 8000
DASHBOARD_PORT = 8265                  # also the Job API: code runs as the cluster's user
OPERATOR_NAMESPACE = "ray-system"      # where the KubeRay operator runs (it polls the dashboard)
MONITORING_NAMESPACE = "monitoring"    # where Prometheus runs
RAY_POD = {"matchLabels": {"ray.io/is-ray-node": "yes"}}  # the label KubeRay gives Ray pods


def serve_config_of(settings: Settings, cluster_config: dict) -> dict:
    """The Serve config of a cluster: written before any deploy, so every model reference stays
    an alias that each replica resolves when it starts (`llmops swap` pins versions later)."""
    from serve_apps.deploy import serve_config

    gpu = uses_gpu(settings.serve.use_gpu, node_types(cluster_config))
    return serve_config(settings.serve, settings.registry.tracking_uri, gpu, dict(PLATFORM_ENV),
                        settings.log_settings(), settings.governance(), pin_models=False,
                        logging=settings.monitoring.logging.serve())


def _images(cluster_config: dict) -> tuple[str, dict[str, str]]:
    docker = cluster_config.get("docker") or {}
    head = docker.get("head_image") or docker["image"]
    workers = {name: (t.get("docker") or {}).get("worker_image") or docker.get("worker_image")
               or docker["image"] for name, t in cluster_config["available_node_types"].items()}
    return head, workers


def _resources_param(resources: dict[str, float]) -> dict:
    """rayStartParams for a type's CPU, GPU and custom resources (KubeRay's quoting)."""
    params = {"num-cpus": str(int(resources.get("CPU", 0))),
              "num-gpus": str(int(resources.get("GPU", 0)))}
    custom = {k: int(v) if float(v).is_integer() else v for k, v in resources.items()
              if k not in ("CPU", "GPU", "memory")}
    if custom:
        params["resources"] = json.dumps(json.dumps(custom))
    return params


def tls_mount(tls: TlsConfig) -> tuple[dict, dict] | None:
    """The Secret `llmops-tls` (keys named as the files of `serve.tls`) as a volume and its
    mount at their folder, for the head pod, where Serve's proxy runs; None without HTTPS."""
    if not tls.enabled:
        return None
    paths = [PurePosixPath(p) for p in (tls.certfile, tls.keyfile, tls.ca_certs) if p]
    if len({p.parent for p in paths}) != 1:
        raise LLMOpsError("serve.tls: on KubeRay the certificate, key and CA bundle are one "
                          "Secret mounted at one folder: put them in the same folder")
    if str(paths[0].parent) in (CONFIG_DIR, SECRETS_DIR, DATA_DIR):
        raise LLMOpsError(f"serve.tls: {paths[0].parent} is another volume's mount on KubeRay: "
                          "use a folder of its own (e.g. /home/ray/tls)")
    return ({"name": "tls", "secret": {"secretName": "llmops-tls", "defaultMode": 0o400}},
            {"name": "tls", "mountPath": str(paths[0].parent), "readOnly": True})


def _pod(name: str, image: str, resources: dict[str, float], data_volume: dict,
         secrets: bool, tls: tuple[dict, dict] | None = None) -> dict:
    """A Ray pod: the settings ConfigMap at $LLMOPS_CONFIG, the data folder, shared memory for
    DeepSpeed and the object store, with `secrets` the JWT Secret (required: a replica
    without it would make up its own and refuse every token), and `tls` as `tls_mount`."""
    cpus, gpus = resources.get("CPU", 1), int(resources.get("GPU", 0))
    limits = {"cpu": str(int(cpus)), "memory": f"{int(cpus * GIB_PER_CPU)}Gi",
              **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"spec": {
        "containers": [{
            "name": name, "image": image,
            "env": [{"name": "LLMOPS_CONFIG", "value": f"{CONFIG_DIR}/llmops.yaml"}],
            "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
            "resources": {"requests": limits, "limits": limits},
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR},
                             {"name": "data", "mountPath": DATA_DIR},
                             {"name": "dshm", "mountPath": "/dev/shm"}]
            + ([{"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True}] if secrets
               else []) + ([tls[1]] if tls else [])}],
        "volumes": [{"name": "config", "configMap": {"name": "llmops-settings"}},
                    {"name": "data", **data_volume},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        + ([{"name": "secrets", "secret": {"secretName": "llmops-jwt"}}] if secrets else [])
        + ([tls[0]] if tls else []),
        **({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}]} if gpus else {})}}


def _cluster_spec(cluster_config: dict, worker_types: list[str] | None = None,
                  head_data: dict | None = None, secrets: bool = False,
                  tls: tuple[dict, dict] | None = None) -> dict:
    """A RayCluster spec: the head as in cluster.yaml (with `tls` as `tls_mount`), a worker
    group per node type (all, or `worker_types`), the in-tree autoscaler with the same idle
    timeout."""
    types = node_types(cluster_config)
    head_type = cluster_config["head_node_type"]
    head_image, worker_images = _images(cluster_config)
    head_resources = types[head_type]["resources"]
    groups = []
    for name, t in types.items():
        if name == head_type or (worker_types is not None and name not in worker_types):
            continue
        spec = cluster_config["available_node_types"][name]
        groups.append({
            "groupName": name, "replicas": spec.get("min_workers", 0),
            "minReplicas": spec.get("min_workers", 0), "maxReplicas": t["max_workers"],
            "rayStartParams": {**_resources_param(t["resources"]),
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod("ray-worker", worker_images[name], t["resources"],
                             {"emptyDir": {}}, secrets)})
    idle_s = int(float(cluster_config.get("idle_timeout_minutes", 5)) * 60)
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": idle_s},
        "headGroupSpec": {
            "rayStartParams": {**_resources_param(head_resources), "dashboard-host": "0.0.0.0",
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod("ray-head", head_image, head_resources,
                             head_data or {"emptyDir": {}}, secrets, tls)},
        "workerGroupSpecs": groups}


def _namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def network_policies() -> list[dict]:
    """Who may reach what: Ray pods reach each other; from outside, only Serve's HTTP port is
    open; the dashboard and its Job API to the KubeRay operator alone, the metrics port to
    Prometheus alone; MLflow (which the controller and replicas unpickle models from) to Ray
    pods alone. Everything else, GCS included, is refused."""

    def policy(name: str, pods: dict, ingress: list[dict]) -> dict:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name},
                "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress}}

    def port(number: int) -> list[dict]:
        return [{"protocol": "TCP", "port": number}]

    return [
        policy("llmops-ray", RAY_POD, [
            {"from": [{"podSelector": RAY_POD}]},
            {"ports": port(SERVE_PORT)},
            {"from": [_namespace(OPERATOR_NAMESPACE)], "ports": port(DASHBOARD_PORT)},
            {"from": [_namespace(MONITORING_NAMESPACE)], "ports": port(METRICS_PORT)}]),
        policy("llmops-mlflow", {"matchLabels": {"app": "mlflow"}},
               [{"from": [{"podSelector": RAY_POD}], "ports": port(5000)}])]


def _settings_map(settings_text: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llmops-settings"},
            "data": {"llmops.yaml": settings_text}}


def rayservice(settings: Settings, settings_text: str, cluster_config: dict) -> list[dict]:
    """The settings ConfigMap, the head's data volume claim, the RayService and the network
    policies around it."""
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "llmops-head-data"},
             "spec": {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": "50Gi"}}}}
    service = {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "llmops"},
        "spec": {
            "serveConfigV2": _yaml(serve_config_of(settings, cluster_config)),
            "rayClusterConfig": _cluster_spec(
                cluster_config,
                head_data={"persistentVolumeClaim": {"claimName": "llmops-head-data"}},
                secrets=True, tls=tls_mount(settings.serve.tls))}}
    return [_settings_map(settings_text), claim, service, *network_policies()]


def rayjob(settings: Settings, cluster_config: dict, task: str) -> list[dict]:
    """A RayJob that fine-tunes `task` on a cluster of its own (a head and the node types its
    workers fit on, per `cluster.capacity`), registers the version, then goes away."""
    types = node_types(cluster_config)
    need = Request("train worker", settings.training.worker_resources(
        uses_gpu(settings.training.use_gpu, types)))
    groups = [n for n in fitting(need, types) if n != cluster_config["head_node_type"]]
    job = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": f"llmops-finetune-{task}"},
        "spec": {
            "entrypoint": f"llmops train {task}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "rayClusterSpec": _cluster_spec(cluster_config, worker_types=groups)}}
    return [job]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded settings file and Serve config) as `|` blocks; no
    anchors for repeated values."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def _yaml(document: dict) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def dump(documents: list[dict]) -> str:
    header = "# Generated by `llmops kuberay` from cluster.yaml and cluster/config/llmops.yaml:\n" \
             "# edit those and regenerate (make manifests), not this file.\n"
    return header + "---\n".join(_yaml(d) for d in documents)


def write_all(settings_file: Path, cluster_file: Path, out_dir: Path,
              tasks: tuple[str, ...] = ("support-router",)) -> list[Path]:
    """Write the RayService and one RayJob per task into `out_dir`; the paths written."""
    from cluster.capacity import load_cluster_config
    from cluster.settings import load_settings

    settings = load_settings(settings_file, environ={})
    cluster_config = load_cluster_config(cluster_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {out_dir / "rayservice.yaml": rayservice(settings, settings_file.read_text(),
                                                     cluster_config)}
    for task in tasks:
        files[out_dir / f"rayjob-{task}.yaml"] = rayjob(settings, cluster_config, task)
    for path, docs in files.items():
        path.write_text(dump(docs))
    return list(files)
