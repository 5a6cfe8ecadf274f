"""The monitor: every `interval_s` it runs the drift policy on each champion's logged traffic
(classifiers' and generators') and keeps the latest verdicts, which Prometheus scrapes from its
/metrics together with the registry's versions and the health check's last result
(`monitoring/metrics.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

from monitoring.config import MonitoringConfig
from monitoring.drift import Decision, NotEnoughData, check_model
from monitoring.metrics import drift_families, exposition, registry_families, registry_of, textfile_families
from training.errors import LLMOpsError
from training.registry import CHAMPION

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, registry, log_uri: str, config: MonitoringConfig, textfile_dir: Path):
        self.registry, self.log_uri, self.config = registry, log_uri, config
        self.decisions: dict[str, Decision | None] = {}
        self.checked_at: dict[str, float] = {}
        self.failures: Counter[str] = Counter()
        self.models: list[dict] = []
        self._profile: dict[tuple[str, str], bool] = {}
        self.listening = False  # /metrics is served (`run`)
        self.prometheus = registry_of(
            lambda: drift_families(self.decisions, self.checked_at, self.failures),
            lambda: registry_families(self.models),
            lambda: textfile_families(textfile_dir))

    def _profiled(self, name: str, version: str) -> bool:
        """Drift is checked for versions registered with a reference profile (classifiers and
        generators; an encoder or a version of an older llmops has none); cached per version."""
        if (name, version) not in self._profile:
            try:
                self._profile[name, version] = not self.registry.reference_profile(
                    name, version).empty
            except LLMOpsError:
                self._profile[name, version] = False
        return self._profile[name, version]

    def tick(self) -> dict[str, Decision | None]:
        """One round of checks. A model with too little traffic has no verdict (None); a check
        that fails is counted and logged, and the others still run."""
        self.models = self.registry.models()
        for m in self.models:
            name, champion = m["name"], m["aliases"].get(CHAMPION)
            if champion is None or not self._profiled(name, str(champion)):
                continue
            try:
                self.decisions[name] = check_model(self.log_uri, self.registry, self.config.drift,
                                                   name)
                _report(name, self.decisions[name])
            except NotEnoughData:
                self.decisions[name] = None
                log.info("%s: too few requests for a drift check", name, extra={"model": name})
            except Exception:
                self.failures[name] += 1
                log.exception("drift check of %s failed", name, extra={"model": name})
            self.checked_at[name] = time.time()
        return dict(self.decisions)

    def text(self) -> str:
        """What a scrape of /metrics returns now."""
        return exposition(self.prometheus)

    def run(self, stop: threading.Event) -> None:
        """Serve /metrics and check every `interval_s` until `stop` is set (after the check in
        progress)."""
        from prometheus_client import start_http_server

        cfg = self.config.monitor
        server, _ = start_http_server(cfg.port, addr=cfg.host, registry=self.prometheus)
        self.listening = True
        log.info("serving http://%s:%d/metrics, drift checks every %g s", cfg.host, cfg.port,
                 cfg.interval_s)
        try:
            while not stop.is_set():
                began = time.monotonic()
                self.tick()
                stop.wait(max(0.0, cfg.interval_s - (time.monotonic() - began)))
        finally:
            server.shutdown()

    def serve(self) -> None:
        """`run` in the foreground until SIGINT or SIGTERM, which stop it after the check in
        progress (an interrupt inside Evidently or pandas can leave their worker threads
        hanging)."""
        import signal

        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped")


def _report(name: str, decision: Decision) -> None:
    """One log line per verdict, its figures as fields of the JSON line."""
    log.info("%s v%s: %s (%d of %d windows drifted)", name, decision.version,
             "DRIFT" if decision.drift else "no drift", decision.drifted_windows,
             len(decision.windows), extra={"model": name, "model_version": decision.version,
                                           "drift": decision.drift,
                                           "drifted_windows": decision.drifted_windows,
                                           "windows": len(decision.windows)})
