"""The Ray runtime the CLI works on: a local head started for the command, or a cluster."""

from __future__ import annotations

import os

from cluster.settings import RayConfig

# Environment every process of the platform runs with: no hub downloads, no telemetry.
PLATFORM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else each progress line reaches the driver twice
}


_started_here = False


def apply_platform_env() -> None:
    for key, value in PLATFORM_ENV.items():
        os.environ.setdefault(key, value)


def connect(config: RayConfig) -> None:
    """Join the configured cluster, or start a local head with the dashboard on loopback."""
    import ray

    global _started_here
    apply_platform_env()
    if ray.is_initialized():
        return
    kwargs = {}
    if config.address is None:
        kwargs = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                  "include_dashboard": config.include_dashboard,
                  "dashboard_host": config.dashboard_host, "dashboard_port": config.dashboard_port,
                  "_metrics_export_port": config.metrics_export_port}
    ray.init(address=config.address, log_to_driver=True, configure_logging=True,
             logging_level="WARNING", runtime_env={"env_vars": dict(PLATFORM_ENV)}, **kwargs)
    _started_here = True


def disconnect() -> None:
    """Undo `connect` (a local head it started stops); a Ray the caller started stays up."""
    import ray

    global _started_here
    if _started_here:
        ray.shutdown()
        _started_here = False


def use_gpu(setting: str) -> bool:
    """`auto`: train on GPUs when the cluster has any (CUDA), else on CPUs."""
    import ray

    if setting != "auto":
        return setting == "yes"
    return ray.cluster_resources().get("GPU", 0) >= 1
