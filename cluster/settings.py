"""The one settings object: `llmops.yaml`, then `LLMOPS_...` environment overrides, then flags.

Each package owns its config model (training, registry, ...); this module composes them. Nested
keys use a double underscore in the environment: `LLMOPS_TRAINING__WORKERS=1`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from monitoring.config import MonitoringConfig
from serve_apps.config import ServeConfig
from serve_apps.model_config import CanaryConfig
from training.config import RegistryConfig, TrainingConfig, TuneConfig
from training.errors import LLMOpsError

DEFAULT_FILE = "llmops.yaml"
ENV_PREFIX = "LLMOPS_"
CONFIG_ENV = "LLMOPS_CONFIG"


class SettingsError(LLMOpsError):
    """An unreadable settings file, an unknown key or a bad value."""


class RayConfig(BaseModel):
    """Where Ray runs: empty `address` starts a local head for the command; `auto` joins one."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int = Field(8080, ge=1, le=65535)
    node_ip_address: str = Field("127.0.0.1", description="the local head's address (a "
                                 "cluster's nodes use their own). Loopback is taken as Ray's "
                                 "clients take it: the machine's routed address when it has "
                                 "one, so the head's GCS listens there (keep the port closed to "
                                 "other hosts), else loopback")


class CanaryPolicy(BaseModel):
    """When a canary challenger may be promoted: after `min_requests` answered by it, with its
    error rate, latency, confidence and (given enough labels) feedback accuracy no worse than
    the champion's over the same period by more than these allowances."""

    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(CanaryConfig.model_fields["fraction"].default, gt=0, le=1,
                            description="share of request ids it answers")
    shadow: bool = Field(False, description="mirror requests instead of answering them")
    min_requests: int = Field(100, ge=1)
    max_error_rate_increase: float = Field(0.01, ge=0, le=1)
    max_latency_ratio: float = Field(1.5, ge=1, description="challenger p50 / champion p50")
    max_confidence_drop: float = Field(0.05, ge=0, le=1)
    max_accuracy_drop: float = Field(0.02, ge=0, le=1, description="on feedback labels, once "
                                     "both sides have 30")
    timeout_s: float = Field(3600, gt=0, description="not enough traffic by then: roll back")


class LabelShiftPolicy(BaseModel):
    """When drift is a label shift the champion answers by new class priors instead of a
    retrain (`cluster/label_shift.py`): the priors re-estimated from unlabelled traffic moved
    by at least `min_shift` (total variation) and explain the drift; then confirmed by
    `min_labels` feedback labels, else a retrain follows."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    min_shift: float = Field(0.05, gt=0, le=1, description="total variation distance between "
                             "the re-estimated and the training priors")
    min_labels: int = Field(30, ge=1, description="labels that confirm or refute the priors")
    max_accuracy_drop: float = Field(0.05, ge=0, le=1, description="feedback accuracy below "
                                     "the reference's under the new priors by more: retrain")
    timeout_s: float = Field(3600, gt=0, description="too few labels by then: keep the priors "
                             "unconfirmed")


class ControllerConfig(BaseModel):
    """The closed loop per monitored model: drift -> retrain -> gate -> canary -> promotion."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(default_factory=lambda: ["support-router", "moderation"])
    autostart: bool = Field(True, description="`llmops up` starts a controller actor for each of "
                            "`models` (and `llmops down` stops them); false: `llmops controller "
                            "start` does")
    store: str | None = Field(None, description="state and events; empty: <data_dir>/controller")
    interval_s: float = Field(10.0, gt=0, description="seconds between steps")
    cooldown_s: float = Field(3600.0, ge=0, description="after a retrain ends, before the next")
    max_retrains_per_day: int = Field(3, ge=0)
    recent_rows: int = Field(5000, ge=10, description="newest logged requests searched for "
                             "feedback labels when retraining")
    label_wait_s: float = Field(300.0, ge=0, description="how long a retrain on drift waits "
                                "for labels while feedback suggests a move with too few "
                                "labels to tell from noise (a concept shift found by its "
                                "first labels)")
    concept_shift_labels: int = Field(200, ge=0, description="labels since the drift's onset "
                                      "a retrain on a concept shift waits for, up to "
                                      "label_wait_s: the replay is relabelled as far as the "
                                      "labels reach the moved regions (a retrain on 107 learnt "
                                      "part of a reorganisation and needed a second)")
    contradiction_labels: int = Field(50, ge=0, description="while serving with no drift, "
                                      "the labels since are checked against the champion's "
                                      "training data every this many new ones: a move they "
                                      "show starts a retrain (0: never)")
    retrain_workers: int = Field(2, ge=1, description="Ray Train workers of a retrain")
    retrain_cpus_per_worker: float = Field(0.02, gt=0, description="what each asks of the "
                                           "scheduler: a retrain shares the nodes with serving")
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    label_shift: LabelShiftPolicy = Field(default_factory=LabelShiftPolicy)


class Settings(BaseModel):
    """Every setting of the platform, validated once at the edge."""

    model_config = ConfigDict(extra="forbid")
    data_dir: Path = Path(".llmops")
    ray: RayConfig = Field(default_factory=RayConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)

    @property
    def storage_path(self) -> str:
        """Ray Train / Tune results and checkpoints: `training.storage_path` (a URI on a
        cluster), or a folder under the data dir."""
        return self.training.storage_path or str(self.data_dir.resolve() / "ray_results")

    @property
    def log_uri(self) -> str:
        """The inference and feedback logs: `monitoring.log.uri`, or under the data dir."""
        return self.monitoring.log.uri or str(self.data_dir.resolve() / "inference_log")

    @property
    def audit_dir(self) -> Path:
        """The audit log's folder: `monitoring.audit.folder`, or under the data dir."""
        folder = self.monitoring.audit.folder
        return Path(folder) if folder else self.data_dir.resolve() / "audit"

    @property
    def controller_uri(self) -> str:
        return self.controller.store or str(self.data_dir.resolve() / "controller")

    @property
    def metrics_dir(self) -> Path:
        """Prometheus textfiles of batch commands (`llmops healthcheck`) the monitor serves."""
        return self.data_dir.resolve() / "metrics"

    def log_settings(self) -> dict | None:
        """What pipelines receive to write the log; None when it is switched off."""
        log = self.monitoring.log
        return {"uri": self.log_uri, **log.model_dump(exclude={"uri", "enabled"})} if log.enabled \
            else None

    def governance(self) -> dict:
        """What the pipelines' policies receive (`serve_apps.policies.chain`), every path
        resolved: the token secret, the quota ledger, the audit folder (None when off)."""
        from serve_apps.auth import secret_path

        data = self.data_dir.resolve()
        auth, quota, audit = self.serve.auth, self.serve.quota, self.monitoring.audit
        auth = auth.model_copy(update={"secret_file": str(secret_path(auth, data))})
        quota = quota.model_copy(update={"store": quota.store or str(data / "quota.json")})
        return {"auth": auth.model_dump(mode="json"), "quota": quota.model_dump(mode="json"),
                "audit": {"folder": str(self.audit_dir),
                          **audit.model_dump(exclude={"folder", "enabled"})}
                if audit.enabled else None}

    @property
    def dashboard_address(self) -> str:
        """The Ray dashboard (Serve's REST API) of the cluster the platform runs on."""
        return f"http://{self.ray.dashboard_host}:{self.ray.dashboard_port}"


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = tree[key] = {}
        tree = node
    tree[path[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict:
    """`LLMOPS_A__B=value` as {"a": {"b": value}}, values parsed as YAML scalars."""
    tree: dict = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        _set_path(tree, path, yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _describe(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                  overrides: dict | None = None) -> Settings:
    """Settings from the file (`--config`, `$LLMOPS_CONFIG` or ./llmops.yaml if present),
    environment overrides and explicit overrides (command-line flags), in that order."""
    environ = os.environ if environ is None else environ
    explicit = path or environ.get(CONFIG_ENV)
    file = Path(explicit) if explicit else Path(DEFAULT_FILE)
    tree: dict = {}
    if explicit or file.exists():
        try:
            tree = yaml.safe_load(file.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {file}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise SettingsError(f"{file}: not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(tree, dict):
            raise SettingsError(f"{file}: expected a mapping of settings at the top level")
    tree = _merge(_merge(tree, env_overrides(environ)), overrides or {})
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, str(file) if tree else "settings")) from exc
