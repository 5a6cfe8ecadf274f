"""The closed loop's test stack (tests/cluster/test_controller.py, test_loop.py): a registry
with a router champion and a worse challenger, settings on the session's Ray, and what serving
would have logged."""

from conftest import register_quick, tiny_settings

from cluster.controller import Controller
from monitoring.config import LogConfig
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now
from training.config import RetrainConfig
from training.data import generate
from training.registry import Registry

MODEL = "support-router"


def build(ray_session, tmp_path):
    """A registry with a good champion (v1) and a worse challenger (v2) of the router, and
    settings that reach the session's Ray dashboard (no Serve application runs)."""
    settings = tiny_settings(tmp_path / "state")
    settings.ray.dashboard_port = int(ray_session.dashboard.rsplit(":", 1)[1])
    settings.training.use_gpu = "no"  # the session's GPUs are logical ones
    settings.training.retrain = RetrainConfig(min_labelled=40, replay_rows=192,
                                              validation_rows=32)
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, MODEL, epochs=8)
    register_quick(settings, registry, MODEL, epochs=1, lr=1e-6)
    return settings, registry, Controller(settings, MODEL, registry)


def log_served(settings, registry, scenario: str, n: int, labelled: int, version: int = 1,
               priors: dict | None = None, seed: int = 11) -> None:
    """What serving writes for n requests answered by `version` (adjusted to `priors`): log
    records with the features drift checks read and the (redacted) text, and feedback labels
    for the first `labelled`."""
    from serve_apps.model import load

    df = generate("support-tickets", scenario, n, seed=seed)
    out = load(f"models:/{MODEL}/{version}", registry.tracking_uri).classify(list(df.text),
                                                                            priors=priors)
    writer = SegmentWriter(settings.log_uri, INFERENCE, LogConfig())
    ts = now()
    writer.write_segment([
        {"request_id": f"q{seed}-{i}", "item": 0, "ts": ts, "tenant": "default",
         "application": "support",
         "model": MODEL, "model_version": str(version), "variant": "champion",
         **out[i]["features"], "prediction": out[i]["label"],
         "confidence": float(out[i]["confidence"]), "latency_ms": 5.0, "outcome": "ok",
         "text": df.text[i]} for i in range(n)])
    if labelled:
        SegmentWriter(settings.log_uri, FEEDBACK, LogConfig()).write_segment([
            {"request_id": f"q{seed}-{i}", "item": 0, "label": df.label[i], "ts": ts,
             "tenant": "default"} for i in range(labelled)])
