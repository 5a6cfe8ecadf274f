"""Prometheus metrics of the monitor (`llmops monitor`) and of the health check, through
`prometheus-client`. The serving path's own metrics come from the replicas
(`serve_apps/metrics.py`, exported by Ray with a `ray_` prefix).

    llmops_drift_score{model, model_version, metric}          newest window's value per metric
    llmops_drift_threshold{model, model_version, metric}      the threshold it is compared with
    llmops_drift_window_drifted{model, model_version}         1 when the newest window drifted
    llmops_drift_detected{model, model_version}               1 when the policy (k of n) declares drift
    llmops_drift_window_rows{model, model_version}            requests in the newest window
    llmops_drift_check_timestamp_seconds{model}               when the model was last checked
    llmops_drift_check_failures_total{model}                  checks that raised (not "too few rows")
    llmops_model_versions{model}                              registered versions (one per retrain)
    llmops_model_alias_version{model, alias}                  version behind champion / challenger
    llmops_healthcheck_value{model, model_version, check}     golden-set figure measured now
    llmops_healthcheck_baseline{model, model_version, check}  the same figure at registration
    llmops_healthcheck_limit{model, model_version, check}     worst value still healthy
    llmops_healthcheck_healthy{model, model_version}          1 healthy, 0 degraded
    llmops_healthcheck_timestamp_seconds                      when the health check last ran

Each collector builds its families from the latest state at scrape time, so a model version
that is no longer checked leaves no stale series behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[list[str], float]]
           ) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def drift_families(decisions: dict, checked_at: dict[str, float], failures: dict[str, int]
                   ) -> Iterator[Metric]:
    """From the latest `Decision` per model (None when its window was too small)."""
    newest = {m: d.windows[-1] for m, d in decisions.items() if d is not None}
    mv = ["model", "model_version"]
    yield _gauge("llmops_drift_score", "Newest window's drift metric value.", mv + ["metric"],
                 (([m, w.version, x.name], x.value) for m, w in newest.items() for x in w.metrics))
    yield _gauge("llmops_drift_threshold", "Threshold of each drift metric.", mv + ["metric"],
                 (([m, w.version, x.name], x.threshold) for m, w in newest.items()
                  for x in w.metrics))
    yield _gauge("llmops_drift_window_drifted", "1 when the newest window drifted.", mv,
                 (([m, w.version], float(w.drifted)) for m, w in newest.items()))
    yield _gauge("llmops_drift_detected", "1 when k of the last n windows drifted.", mv,
                 (([m, d.version], float(d.drift)) for m, d in decisions.items() if d))
    yield _gauge("llmops_drift_window_rows", "Requests in the newest window.", mv,
                 (([m, w.version], w.rows) for m, w in newest.items()))
    yield _gauge("llmops_drift_check_timestamp_seconds", "When the model was last checked.",
                 ["model"], (([m], t) for m, t in checked_at.items()))
    failed = CounterMetricFamily("llmops_drift_check_failures", "Drift checks that raised.",
                                 labels=["model"])
    for m in checked_at:  # 0 from a model's first check on, so increase() sees the first failure
        failed.add_metric([m], failures.get(m, 0))
    yield failed


def registry_families(models: list[dict]) -> Iterator[Metric]:
    """From `Registry.models()`: versions registered and the version behind each alias."""
    yield _gauge("llmops_model_versions", "Registered versions of the model.", ["model"],
                 (([m["name"]], len(m["versions"])) for m in models))
    yield _gauge("llmops_model_alias_version", "Version behind each alias.", ["model", "alias"],
                 (([m["name"], a], v) for m in models for a, v in m["aliases"].items()))


def health_families(results: list, timestamp: float) -> Iterator[Metric]:
    """From `health.ModelHealth` results."""
    labels = ["model", "model_version", "check"]
    checks = [(r, c) for r in results for c in r.checks]
    yield _gauge("llmops_healthcheck_value", "Golden-set figure measured now.", labels,
                 (([r.model, r.version, c.name], c.value) for r, c in checks))
    yield _gauge("llmops_healthcheck_baseline", "The figure recorded at registration.", labels,
                 (([r.model, r.version, c.name], c.baseline) for r, c in checks))
    yield _gauge("llmops_healthcheck_limit", "Worst value still healthy.", labels,
                 (([r.model, r.version, c.name], c.limit) for r, c in checks))
    yield _gauge("llmops_healthcheck_healthy", "1 healthy, 0 degraded.", ["model", "model_version"],
                 (([r.model, r.version], float(r.healthy)) for r in results))
    yield _gauge("llmops_healthcheck_timestamp_seconds", "When the health check last ran.", [],
                 [([], timestamp)])


class Families:
    """A collector around a function that yields metric families (prometheus-client calls
    `collect()` at every scrape)."""

    def __init__(self, produce):
        self.produce = produce

    def collect(self) -> Iterator[Metric]:
        yield from self.produce()


def textfile_families(folder: Path) -> Iterator[Metric]:
    """Families of every `*.prom` file in `folder` (what `llmops healthcheck` writes), so one
    scrape of the monitor carries them, as node_exporter's textfile collector would."""
    for path in sorted(folder.glob("*.prom")) if folder.is_dir() else []:
        yield from text_string_to_metric_families(path.read_text())


def registry_of(*produce) -> CollectorRegistry:
    registry = CollectorRegistry()
    for p in produce:
        registry.register(Families(p))
    return registry


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def write_textfile(registry: CollectorRegistry, path: Path) -> None:
    """Written beside and renamed, so a scrape never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
