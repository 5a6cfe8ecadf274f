"""The health check: each champion measured again on its golden set (quality, confidence, batch
latency) through the same function as at registration (`training/evaluate.py`), compared with the
figures registration recorded. A figure beyond its tolerance, or a champion that cannot be
measured, makes the check fail (`llmops healthcheck` exits 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from monitoring.config import HealthConfig
from training.errors import UnknownName
from training.evaluate import QUALITY, measure
from training.registry import CHAMPION, GOLDEN_FILE


@dataclass
class Check:
    name: str
    value: float
    baseline: float
    limit: float
    ok: bool


@dataclass
class ModelHealth:
    model: str
    version: str
    healthy: bool
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare(now: dict[str, float], registered: dict[str, float], kind: str,
            config: HealthConfig) -> list[Check]:
    """Golden-set figures now against those at registration (`golden_<figure>` run metrics)."""
    quality = QUALITY[kind]
    base = {k: registered[f"golden_{k}"] for k in (quality, "confidence", "latency_p50_ms")}
    limits = {quality: (base[quality] - config.quality_tolerance, min),
              "confidence": (base["confidence"] - config.confidence_tolerance, min),
              "latency_p50_ms": (base["latency_p50_ms"] * config.latency_factor
                                 + config.latency_slack_ms, max)}
    return [Check(name, round(now[name], 4), round(base[name], 4), round(limit, 4),
                  now[name] >= limit if bound is min else now[name] <= limit)
            for name, (limit, bound) in limits.items()]


def check_champion(registry, model: str, version: str, config: HealthConfig) -> ModelHealth:
    try:
        registered = registry.run_metrics(model, version)
        if "golden_latency_p50_ms" not in registered:
            raise LookupError("no golden-set figures were recorded at registration (register a "
                              "new version)")
        task_model = registry.load_model(model, version)
        golden = registry.run_data(model, version, GOLDEN_FILE)
        kind = task_model.meta["kind"]
        now = measure(lambda df: task_model.predict(None, df), golden, kind)
        checks = compare(now, registered, kind, config)
        return ModelHealth(model, version, all(c.ok for c in checks), checks)
    except Exception as exc:  # any failure to measure a champion is itself unhealthy
        return ModelHealth(model, version, False,
                           error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def check_champions(registry, config: HealthConfig, models: list[str] | None = None
                    ) -> list[ModelHealth]:
    """Every registered model's champion (or those named: UnknownName for one not registered)."""
    registered = {m["name"]: m["aliases"].get(CHAMPION) for m in registry.models()}
    for name in models or []:
        if name not in registered:
            raise UnknownName("registered model", name, sorted(registered))
    return [check_champion(registry, name, str(registered[name]), config)
            if registered[name] is not None
            else ModelHealth(name, "none", False, error="no champion registered")
            for name in models or sorted(registered)]
