"""The Ray runtime the CLI works on: a local head started for the command, or a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.settings import RayConfig
from monitoring.config import LoggingSettings
from training.errors import LLMOpsError

# Environment every process of the platform runs with: no hub downloads, no telemetry.
PLATFORM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else each progress line reaches the driver twice
    # Ray Train's controller reads its workers' state this often (Ray's default 2 s), and each
    # fine-tune waits for a read to start, to report and to end: the loop's fine-tunes are short
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # GCS keeps the events of this many tasks (every handle call is one) for the dashboard:
    # Ray's 100,000 grew its memory for hours under steady load (bench/soak.py)
    "RAY_task_events_max_num_task_in_gcs": "10000",
    # ... and the ids of every task whose events it dropped, up to 1,000,000 per job by
    # default: about 40 bytes per handle call, for hours (the Serve job never ends)
    "RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs": "10000",
    # glibc gives each thread that allocates its own arena (replicas run models in a thread
    # pool), and freed memory stays in them: RSS crept up under steady load (bench/soak.py)
    "MALLOC_ARENA_MAX": "2",
}


_started_here = False


def apply_platform_env() -> None:
    for key, value in PLATFORM_ENV.items():
        os.environ.setdefault(key, value)


def connect(config: RayConfig, logging: LoggingSettings | None = None) -> None:
    """Join the configured cluster, or start a local head with the dashboard on loopback; the
    job's workers and actors log as `logging` says (Ray's default when None)."""
    import ray

    global _started_here
    apply_platform_env()
    if ray.is_initialized():
        return
    kwargs = {}
    if config.address is None:
        kwargs = {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                  "_node_ip_address": config.node_ip_address,
                  "include_dashboard": config.include_dashboard,
                  "dashboard_host": config.dashboard_host, "dashboard_port": config.dashboard_port,
                  "_metrics_export_port": config.metrics_export_port}
    if logging is not None:
        kwargs["logging_config"] = logging.ray()
    ray.init(address=config.address, log_to_driver=True, configure_logging=True,
             logging_level="WARNING", runtime_env={"env_vars": dict(PLATFORM_ENV)}, **kwargs)
    _started_here = True


def log_here(logging: LoggingSettings) -> None:
    """Log from this process (one that runs no Ray driver: the foreground monitor) as the
    platform's Ray processes do, JSON lines by default, through Ray's own formatter; Python
    warnings become log lines too, and the libraries' progress bars stay off the stream."""
    import logging as pylogging

    apply_platform_env()
    os.environ.update({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    logging.ray()._apply()  # what ray.init does with a LoggingConfig in a driver
    pylogging.captureWarnings(True)


def join(config: RayConfig, logging: LoggingSettings | None = None) -> bool:
    """Join the running cluster (the configured address, or the local head `llmops up`
    started) without starting one; False when none answers. `logging` as in `connect`."""
    import ray

    global _started_here
    apply_platform_env()
    if ray.is_initialized():
        return True
    try:
        ray.init(address=config.address or "auto", logging_level="ERROR",
                 runtime_env={"env_vars": dict(PLATFORM_ENV)},
                 **({"logging_config": logging.ray()} if logging else {}))
    except ConnectionError:
        return False
    _started_here = True
    return True


def disconnect() -> None:
    """Undo `connect` (a local head it started stops); a Ray the caller started stays up."""
    import ray

    global _started_here
    if _started_here:
        ray.shutdown()
        _started_here = False


HEAD_FILE = "head.json"


def _ray_cli() -> str:
    """The `ray` command of this environment (also when the venv is not activated)."""
    return str(Path(sys.executable).with_name("ray"))


def start_head(config: RayConfig, data_dir: Path) -> bool:
    """A long-lived local Ray head (`ray start --head`) for `llmops up`, unless one already
    answers; True when this call started it (then `stop_head` may stop it)."""
    import ray

    apply_platform_env()
    try:
        ray.init(address="auto", logging_level="ERROR")
        ray.shutdown()
        return False
    except ConnectionError:
        pass
    from ray._private.services import resolve_ip_for_localhost

    # where Ray's clients will look for it: they turn a loopback address into the machine's
    # routed one when it has one, so a head bound to loopback there would answer nobody
    cmd = [_ray_cli(), "start", "--head", "--disable-usage-stats",
           f"--node-ip-address={resolve_ip_for_localhost(config.node_ip_address)}",
           f"--dashboard-host={config.dashboard_host}", f"--dashboard-port={config.dashboard_port}",
           f"--metrics-export-port={config.metrics_export_port}"]
    cmd += [f"--num-cpus={config.num_cpus}"] if config.num_cpus else []
    cmd += [f"--num-gpus={config.num_gpus}"] if config.num_gpus is not None else []
    env = {**os.environ, **PLATFORM_ENV}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise LLMOpsError(f"ray start failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / HEAD_FILE).write_text(json.dumps({"started_at": time.time()}))
    return True


def stop_head(data_dir: Path) -> bool:
    """Stop the local head if `start_head` started it; False when it was not ours."""
    marker = data_dir / HEAD_FILE
    if not marker.exists():
        return False
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120)
    marker.unlink()
    return True


def cluster_gpus(address: str | None) -> float:
    """GPUs the cluster at `address` has (joining it briefly)."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0)
    ray.init(address=address or "auto", logging_level="ERROR")
    try:
        return ray.cluster_resources().get("GPU", 0)
    finally:
        ray.shutdown()


def wants_gpu(choice: str, gpus: float) -> bool:
    """The one GPU rule (`use_gpu` of training and serving): `yes` and `no` as said; `auto`
    when the cluster has, or its node types can bring, at least one GPU."""
    return choice == "yes" or (choice == "auto" and gpus >= 1)


def use_gpu(setting: str) -> bool:
    """`wants_gpu` against the connected cluster's GPUs."""
    import ray

    return wants_gpu(setting, ray.cluster_resources().get("GPU", 0) if setting == "auto" else 0)
