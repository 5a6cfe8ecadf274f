"""Typed configuration of the monitoring package: the inference log and drift detection."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import StrictModel


class LogConfig(StrictModel):
    """Where and how the inference log is written.

    Every pipeline replica buffers its records and appends them as Parquet segments, off the
    request path, every `flush_interval_s` or as soon as `max_buffered` records wait.
    """

    enabled: bool = True
    uri: str | None = Field(None, description="a folder or fsspec URI (s3://...); empty: "
                            "<data_dir>/inference_log")
    flush_interval_s: float = Field(1.0, gt=0, le=3600)
    max_buffered: int = Field(2000, ge=1, description="records a replica holds before the "
                              "request that fills the buffer waits for a write (bounded memory)")
    keep_text: bool = Field(True, description="keep each text, PII redacted (retraining on "
                            "feedback labels needs it); false keeps only the drift features")
    compact_interval_s: float | None = Field(60.0, gt=0, description="seconds between two "
                                             "compactions of each day's small segments "
                                             "(monitoring/compaction.py); empty: never")
    segment_target_bytes: int = Field(64 * 2**20, ge=2**16, description="compaction merges "
                                      "segments under half this size into ones of up to it")


class LabelQueueConfig(StrictModel):
    """The requests awaiting a label (`GET /v1/feedback/pending`, `monitoring/feedback.py`):
    part of a page is where a label helps most, the rest spread over the traffic no label has
    reached, so a region the model answers with confidence (a new product's intent, a concept
    shift) is still asked about."""

    window: int = Field(5000, ge=10, description="the newest logged answers searched")
    explore: float = Field(0.5, ge=0, le=1, description="share of a page spread over the "
                           "answers least like every labelled one")
    confident: float = Field(0.9, gt=0, le=1, description="calibrated confidence from which a "
                             "labelled answer found wrong points the queue at its neighbours")
    max_limit: int = Field(500, ge=1, description="the most items one page returns")
    lease_s: float = Field(600, ge=0, description="how long a page's items are left out of the "
                           "pages of the tenant's other reviewers, unless labelled first "
                           "(`monitoring/leases.py`; 0: every reviewer sees every item)")


class DriftThresholds(StrictModel):
    """A metric drifts when its value passes its threshold."""

    descriptor_drift: float = Field(0.15, gt=0, description="Evidently's normed Wasserstein "
                                    "distance above which one text descriptor counts as drifted")
    share_of_drifted_descriptors: float = Field(0.4, gt=0, le=1, description="share of drifted "
                                                "descriptors above which the window drifts")
    prediction_drift: float = Field(0.1, gt=0, le=1, description="Evidently's Jensen-Shannon "
                                    "distance of the predicted class (above drifts)")
    confidence_drift: float = Field(0.3, gt=0, description="Evidently's normed Wasserstein "
                                    "distance of confidence (above drifts, with "
                                    "confidence_energy)")
    confidence_energy: float = Field(0.015, gt=0, description="Evidently's energy distance of "
                                     "confidence, unnormed (above drifts, with "
                                     "confidence_drift)")
    embedding_drift: float = Field(0.015, gt=0, description="Evidently's MMD embedding drift "
                                   "score (above drifts)")
    kl_divergence: float = Field(0.05, gt=0, description="KL(window || reference) of the "
                                 "predicted-class distribution, in nats")
    feedback_accuracy_drop: float = Field(0.05, gt=0, le=1, description="accuracy on "
                                          "feedback labels below their mean calibrated "
                                          "confidence")


class DriftConfig(StrictModel):
    """Per-window checks and the decision policy: drift is declared when `k` of the last `n`
    windows drifted, counting only windows of at least `min_rows` requests."""

    window: int = Field(500, ge=10, description="requests per window")
    min_rows: int = Field(200, ge=10)
    k: int = Field(2, ge=1)
    n: int = Field(3, ge=1)
    onset_lookback: int = Field(8, ge=0, description="when drift is declared and the oldest of "
                                "the `n` windows drifted too, up to this many earlier windows are "
                                "checked for where it began (the onset a retrain learns from)")
    reference_rows: int = Field(1000, ge=10, description="rows of the reference profile used")
    sample_rows: int = Field(2000, ge=100, description="a larger window is checked on a seeded "
                             "random sample of this many requests (the KL divergence and feedback "
                             "accuracy use every row): a check's cost stays flat as windows grow")
    thresholds: DriftThresholds = Field(default_factory=DriftThresholds)
    models: dict[str, DriftThresholds] = Field(default_factory=dict,
                                               description="per-model thresholds")

    @model_validator(mode="after")
    def _k_within_n(self) -> DriftConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) cannot exceed n ({self.n})")
        if self.min_rows > self.window:
            raise ValueError(f"min_rows ({self.min_rows}) cannot exceed window ({self.window})")
        return self

    def thresholds_for(self, model: str) -> DriftThresholds:
        return self.models.get(model, self.thresholds)


class HealthConfig(StrictModel):
    """How far a champion's golden-set figures may fall from those recorded at registration
    before `llmops healthcheck` calls it degraded."""

    quality_tolerance: float = Field(0.02, ge=0, le=1, description="drop allowed in accuracy "
                                     "(classifiers) or exact match (generators)")
    confidence_tolerance: float = Field(0.05, ge=0, le=1, description="drop allowed in mean "
                                        "confidence")
    latency_factor: float = Field(2.0, gt=0, description="p50 batch latency may reach this "
                                  "multiple of the registered one (plus the slack)")
    latency_slack_ms: float = Field(20.0, ge=0, description="absolute allowance for timer noise "
                                    "on small models")


class MonitorConfig(StrictModel):
    """`llmops monitor`: the loop that checks drift and serves the metrics of the monitor."""

    host: str = "127.0.0.1"
    port: int = Field(9108, ge=1, le=65535, description="Prometheus scrapes /metrics here")
    interval_s: float = Field(60.0, gt=0, description="seconds between drift checks")
    autostart: bool = Field(True, description="`llmops up` starts it as a detached Ray actor "
                            "(and `llmops down` stops it); false: run `llmops monitor`")


class AuditConfig(StrictModel):
    """The audit log (`monitoring/audit.py`): one hash-chained JSON line per inference in a
    local folder, fsynced before the request is answered."""

    enabled: bool = True
    folder: str | None = Field(None, description="a local folder; empty: <data_dir>/audit")
    max_bytes: int = Field(64 * 2**20, ge=1024, description="a new file past this size (and "
                           "at UTC midnight)")
    anchor_file: str | None = Field(None, description="the independent record of the chain's "
                                    "newest record; empty: <folder>.anchor beside the folder")
    min_free_bytes: int = Field(256 * 2**20, ge=0, description="below this much free space on "
                                "the audit volume requests are refused (503) before the disk "
                                "fills, and the free-space gauge alerts")


class LoggingSettings(StrictModel):
    """How the platform's processes log: Serve's replicas, proxy and controller (Serve's
    `LoggingConfig`) and the Ray workers and drivers of its commands, the loop's controllers and
    the monitor among them (Ray's `LoggingConfig`). JSON lines by default, for a shipper
    (`monitoring/shipping/`): time, level, logger, message, and the Ray and Serve context
    (application, deployment, replica, Serve's request id, job, actor, node)."""

    encoding: Literal["JSON", "TEXT"] = "JSON"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = Field(True, description="Serve's line per request in each replica")

    def serve(self) -> dict:
        """Serve's `logging_config` (per application, and for its proxy and controller)."""
        return {"encoding": self.encoding, "log_level": self.level,
                "enable_access_log": self.access_log, "additional_log_standard_attrs": ["name"]}

    def ray(self):
        import ray

        return ray.LoggingConfig(encoding=self.encoding, log_level=self.level,
                                 additional_log_standard_attrs=["name"])


class MonitoringConfig(StrictModel):
    log: LogConfig = Field(default_factory=LogConfig)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
