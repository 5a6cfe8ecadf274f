"""The platform as a whole on one Ray cluster: `up` (Ray if needed, the Serve applications, the
loop's actors), `status` and `down`. What `llmops up/status/down` print, and what the demo
calls."""

from __future__ import annotations

from cluster import runtime
from cluster.settings import Settings
from training.errors import LLMOpsError


def serve_cluster(settings: Settings):
    """The cluster's Serve, reached through its dashboard; a one-line error when none answers."""
    from serve_apps.deploy import ServeCluster

    try:
        cluster = ServeCluster(settings.dashboard_address)  # (its client connects at once)
        cluster.details()
    except Exception as exc:
        raise LLMOpsError(f"no Ray dashboard at {settings.dashboard_address} "
                          f"(start the platform with `llmops up`)") from exc
    return cluster


def generated_serve_config(settings: Settings, registry, gpus: float) -> dict:
    """The Serve config of the settings, on a cluster with `gpus` GPUs."""
    from serve_apps.deploy import serve_config

    gpu = runtime.wants_gpu(settings.serve.use_gpu, gpus)
    return serve_config(settings.serve, registry.tracking_uri, gpu, dict(runtime.PLATFORM_ENV),
                        settings.log_settings(), settings.governance(),
                        logging=settings.monitoring.logging.serve())


def up(settings: Settings, timeout_s: float = 600) -> dict:
    """Check the TLS files and the registry, start a local Ray head unless `ray.address` names a
    cluster, deploy every application (the config also written to
    `<data_dir>/serve_config.yaml`), start the loop's actors; what runs now."""
    import yaml

    from cluster import loop
    from serve_apps import tls
    from serve_apps.auth import ensure_secret, secret_path
    from training.registry import Registry

    tls.check(settings.serve.tls)  # before anything starts
    registry = Registry(settings.registry, settings.data_dir)
    registry.check()
    if any(a.startswith("HS") for a in settings.serve.auth.algorithms):  # a weak one: refused
        ensure_secret(secret_path(settings.serve.auth, settings.data_dir.resolve()))
    started = False
    if settings.ray.address is None:
        started = runtime.start_head(settings.ray, settings.data_dir)
    config = generated_serve_config(settings, registry, runtime.cluster_gpus(settings.ray.address))
    path = settings.data_dir / "serve_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cluster = serve_cluster(settings)
    seconds = cluster.deploy(config, timeout_s=timeout_s)
    begun = loop.start(settings)
    out = {"dashboard": settings.dashboard_address, "serve_config": str(path),
           "started_ray": started, "seconds": round(seconds, 1), **status(settings, cluster)}
    if begun["monitor"] is not None:  # what it said once started (a port in use, say)
        out["monitor"] |= {k: begun["monitor"][k] for k in ("running", "error")}
    return out


def status(settings: Settings, cluster=None) -> dict:
    """The applications and the loop's actors, from the dashboard's REST API (no Ray driver)."""
    from cluster import loop

    return {"url": settings.serve.url,
            "applications": (cluster or serve_cluster(settings)).status(),
            **loop.status(settings)}


def down(settings: Settings) -> dict:
    """Remove the applications, stop the loop's actors, and the local Ray head if `up` started
    it."""
    from cluster import loop

    try:
        serve_cluster(settings).shutdown()
        removed = True
    except LLMOpsError:
        removed = False
    halted = loop.stop_all(settings) if removed else {"controllers": [], "monitor": False}
    return {"applications_removed": removed, "controllers_stopped": halted["controllers"],
            "monitor_stopped": halted["monitor"],
            "ray_stopped": runtime.stop_head(settings.data_dir)}
