"""MLflow tracking and Model Registry: one run per fine-tune, one version per accepted model.

Aliases: the first version of a model becomes `champion`; later ones become `challenger` until
something promotes them. A version is either fully registered (artifacts, metrics, alias) or
deleted again: a failure part-way leaves no half-registered version behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from training import catalogue
from training.config import RegistryConfig
from training.errors import LLMOpsError, RegistryUnavailable, UnknownName
from training.lineage import Lineage
from training.refs import mlflow_version, reference

CHAMPION, CHALLENGER, FALLBACK = "champion", "challenger", "fallback"
# Tables under each run's data/: the training data, the reference profile for drift checks and
# the golden set of the health check.
REFERENCE_FILE, PROFILE_FILE, GOLDEN_FILE = "reference.parquet", "profile.parquet", "golden.parquet"
PRIORS_TAG = "llmops.priors"  # a version's re-estimated class priors, JSON {label: prior}
# a version's drift reference now includes the drifted traffic it answers (`adopt_traffic`)
ADOPTED_FILE, ADOPTED_TAG = "profile-adopted.parquet", "llmops.adopted_traffic"
# the onset (epoch seconds) of the drift the loop is handling on a version (`drift_onset`)
DRIFT_TAG = "llmops.drift_onset"
# where `download_hf_model` keeps the versions this machine loaded, and how many of them
MODEL_CACHE, CACHED_VERSIONS = Path(tempfile.gettempdir()) / "llmops-models", 16


@dataclass
class RegisteredVersion:
    name: str
    version: int
    alias: str | None
    run_id: str
    model_uri: str


@dataclass
class RunRecord:
    """What a fine-tune leaves for the registry to record."""

    task: str
    model_dir: Path
    params: dict
    history: list[dict]
    holdout_metrics: dict[str, dict]
    ds_config: dict
    datasets: dict[str, pd.DataFrame]
    input_example: pd.DataFrame
    tags: dict
    profile: pd.DataFrame | None = None  # drift features of held-out training-distribution rows
    golden: pd.DataFrame | None = None  # the golden set, measured as holdout "golden"
    # the version's alias: champion for a model's first version, else challenger (a fine-tune
    # to judge); False: none (a distilled student, aliased `fallback` once its gate passes)
    aliased: bool = True


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def download_hf_model(model_uri: str) -> Path:
    """The Hugging Face folder inside the registered version `model_uri` names now, downloaded
    once per machine: a version's files never change, so every process of a node (replicas,
    training workers) shares one copy under `<tmp>/llmops-models/`, of which the
    `CACHED_VERSIONS` used last are kept."""
    import mlflow.artifacts

    from training.pyfunc import META_FILE  # (mlflow.pyfunc: not for importers of this module)

    tracking_uri = mlflow.get_tracking_uri()
    mv = mlflow_version(model_uri, tracking_uri)
    # the version's run tells a version apart from its namesake in a registry made again
    key = hashlib.sha256(json.dumps([tracking_uri, mv.name, mv.version, mv.run_id, mv.source])
                         .encode()).hexdigest()[:24]
    entry = MODEL_CACHE / key
    if not entry.is_dir():
        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=MODEL_CACHE,
                                         ignore_cleanup_errors=True) as part:
            mlflow.artifacts.download_artifacts(artifact_uri=reference(mv.name, mv.version),
                                                dst_path=part)
            with contextlib.suppress(OSError):  # another process of the node got there first
                os.rename(part, entry)
    os.utime(entry)
    _evict_cached_versions()
    # MLflow keeps the artifact under its source folder's name: find it by its metadata file.
    folders = [p.parent for p in entry.rglob(f"artifacts/*/{META_FILE}")]
    if len(folders) != 1:
        raise LLMOpsError(f"{model_uri} was not registered by llmops (no hf artifact)")
    return folders[0]


def _evict_cached_versions() -> None:
    """Remove the cached versions beyond the `CACHED_VERSIONS` used last (the one being used
    was touched just now, so it stays)."""
    used = {}
    for entry in MODEL_CACHE.iterdir():
        with contextlib.suppress(OSError):  # another process may be evicting too
            if not entry.name.startswith("."):
                used[entry] = entry.stat().st_mtime
    for old in sorted(used, key=used.get, reverse=True)[CACHED_VERSIONS:]:
        shutil.rmtree(old, ignore_errors=True)


class Registry:
    """The MLflow tracking server and model registry of one platform."""

    def __init__(self, config: RegistryConfig, data_dir: Path):
        self.config = config
        self.data_dir = Path(data_dir).resolve()
        self.lineage = Lineage(config.lineage, self.data_dir)
        self.tracking_uri = config.tracking_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri

    @classmethod
    def at(cls, tracking_uri: str) -> Registry:
        """The registry behind a resolved tracking URI, for processes that have no settings
        (Serve replicas)."""
        return cls(RegistryConfig(tracking_uri=tracking_uri), Path("."))

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def check(self) -> None:
        """Fail fast, before any training, when the tracking server cannot be reached."""
        if self.tracking_uri.startswith("sqlite:///"):
            self.data_dir.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(self.config.timeout_s))
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # any transport or store error means: unreachable
            raise RegistryUnavailable(f"MLflow at {self.tracking_uri} is unreachable: "
                                      f"{str(exc).splitlines()[0][:200]}") from exc
        finally:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.config.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not self.tracking_uri.startswith(("http://", "https://", "databricks")):
            location = (self.data_dir / "artifacts").as_uri()
        return self.client.create_experiment(self.config.experiment, artifact_location=location)

    def record(self, record: RunRecord) -> RegisteredVersion:
        """Log the run (params, per-epoch metrics, datasets, DeepSpeed config, model) and
        register it as a new version with its alias."""
        import mlflow
        from mlflow.models import infer_signature

        from training.pyfunc import GENERATION_PARAMS, TaskModel

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(experiment_id=self._experiment_id(),
                              run_name=f"{record.task}-finetune") as run:
            mlflow.set_tags({"llmops.task": record.task, "git_commit": _git_commit(), **record.tags})
            mlflow.log_params(record.params)
            for epoch in record.history:
                mlflow.log_metrics({k: float(v) for k, v in epoch.items() if k != "epoch"},
                                   step=int(epoch["epoch"]))
            for holdout, metrics in record.holdout_metrics.items():
                mlflow.log_metrics({f"{holdout}_{k}": v for k, v in metrics.items()})
            mlflow.log_dict(record.ds_config, "deepspeed_config.json")
            for context, (name, df) in zip(["training"] + ["evaluation"] * len(record.datasets),
                                           record.datasets.items()):
                mlflow.log_input(mlflow.data.from_pandas(df, name=name),
                                 context=context, tags={"scenario": name.split(":")[-1]})
            files = {REFERENCE_FILE: next(iter(record.datasets.values())),
                     PROFILE_FILE: record.profile, GOLDEN_FILE: record.golden}
            with tempfile.TemporaryDirectory() as tmp:
                for file, df in files.items():
                    if df is not None:
                        df.to_parquet(Path(tmp) / file, index=False)
                        mlflow.log_artifact(str(Path(tmp) / file), "data")
            sample = TaskModel.from_folder(record.model_dir)
            params = GENERATION_PARAMS if sample.meta["kind"] == "causal-lm" else None
            signature = infer_signature(record.input_example,
                                        sample.predict(None, record.input_example), params=params)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=TaskModel(), artifacts={"hf": str(record.model_dir)},
                signature=signature, input_example=record.input_example,
                pip_requirements=_requirements(), metadata={"llmops": sample.meta})
        return self._register(record.task, info.model_uri, run.info.run_id, {
            k: v for k, v in record.tags.items() if k.startswith("llmops.")}, record.aliased)

    def _register(self, name: str, model_uri: str, run_id: str, tags: dict | None = None,
                  aliased: bool = True) -> RegisteredVersion:
        import mlflow

        client = self.client
        first = not client.search_model_versions(f"name='{name}'", max_results=1)
        mv = mlflow.register_model(model_uri, name, tags={"llmops.run_id": run_id, **(tags or {})})
        if not aliased:
            return RegisteredVersion(name, int(mv.version), None, run_id,
                                     reference(name, mv.version))
        alias = CHAMPION if first else CHALLENGER
        try:
            client.set_registered_model_alias(name, alias, mv.version)
            client.set_model_version_tag(name, mv.version, "llmops.alias_on_registration", alias)
        except Exception:
            client.delete_model_version(name, mv.version)
            raise
        return RegisteredVersion(name, int(mv.version), alias, run_id, reference(name, alias=alias))

    def _version(self, name: str, version: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise UnknownName("model version", f"{name}/{version}",
                              [f"{m['name']}/{v['version']}" for m in self.models()
                               for v in m["versions"]]) from exc

    def labels(self, name: str, version: str) -> list[str]:
        """The label set of a registered classifier (empty for a language model)."""
        import mlflow.models

        mv = self._version(name, version)
        meta = (mlflow.models.get_model_info(reference(name, mv.version)).metadata or {}
                ).get("llmops", {})
        # a language model's meta lists its dataset's labels, which its answers are not
        return list(meta.get("labels", [])) if meta.get("kind") == "classification" else []

    def run_data(self, name: str, version: str, file: str) -> pd.DataFrame:
        """A table logged under `data/` of the run that registered the version
        (`reference.parquet`: its training data; `profile.parquet`: its reference profile)."""
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as scratch:
            return pd.read_parquet(mlflow.artifacts.download_artifacts(
                run_id=self._version(name, version).run_id, artifact_path=f"data/{file}",
                tracking_uri=self.tracking_uri, dst_path=scratch))

    def find_version(self, name: str, tag: str, value: str) -> int | None:
        """The version of `name` carrying model-version tag `tag` = `value` (None: none yet)."""
        found = self.client.search_model_versions(f"name='{name}' and tags.`{tag}` = '{value}'")
        return max((int(v.version) for v in found), default=None)

    def tag_version(self, name: str, version: int, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, value)

    def priors(self, name: str, version: str) -> dict[str, float] | None:
        """The class priors the loop re-estimated for a version after a label shift
        (`PRIORS_TAG`, set by the controller), or None: the training priors hold."""
        tag = self._version(name, version).tags.get(PRIORS_TAG)
        return (json.loads(tag) or None) if tag else None

    def drift_onset(self, name: str, version: str) -> datetime | None:
        """When the drift the loop is handling on the version began (`DRIFT_TAG`, set by the
        controller from drift to serving again), or None: the labels of answers before it
        describe the traffic before the drift, and only those since count towards a retrain."""
        tag = self._version(name, version).tags.get(DRIFT_TAG)
        return datetime.fromtimestamp(float(tag), UTC) if tag else None

    def mark_drift(self, name: str, version: int, onset: float | None) -> None:
        """Record the onset of the drift the loop handles on the version (None: it serves
        again, the tag goes)."""
        if onset is not None:
            self.tag_version(name, version, {DRIFT_TAG: repr(float(onset))})
        elif DRIFT_TAG in self._version(name, version).tags:
            self.client.delete_model_version_tag(name, str(version), DRIFT_TAG)

    def alias_version(self, name: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point `alias` at `version` (None removes it)."""
        if version is None:
            if self.alias_version(name, alias) is not None:
                self.client.delete_registered_model_alias(name, alias)
        else:
            self.client.set_registered_model_alias(name, alias, str(self._version(name, version)
                                                                    .version))

    def load_model(self, name: str, version: str):
        """The registered version as its `TaskModel` (loaded through MLflow, as any client)."""
        import mlflow.pyfunc

        mv = self._version(name, version)
        return mlflow.pyfunc.load_model(reference(name, mv.version)).unwrap_python_model()

    def run_metrics(self, name: str, version: str) -> dict[str, float]:
        """The metrics the run that registered the version logged (`<holdout>_<metric>`)."""
        return dict(self.client.get_run(self._version(name, version).run_id).data.metrics)

    def reference_profile(self, name: str, version: str) -> pd.DataFrame:
        """The drift features of held-out rows of the version's training distribution, logged
        at registration (`training/features.py`: a classifier's, or a generator's), with the
        traffic it serves where it has been profiled: the drifted traffic of its retrain, or
        the traffic the loop adopted since (`adopt_traffic`, which replaces it)."""
        from training.features import SERVED

        try:
            profile = self.run_data(name, version, PROFILE_FILE)
            if ADOPTED_TAG in self._version(name, version).tags:
                held_out = profile[~profile[SERVED].eq(True)] if SERVED in profile else profile
                profile = pd.concat([held_out, self.run_data(name, version, ADOPTED_FILE)],
                                    ignore_index=True)
            return profile
        except UnknownName:
            raise
        except Exception as exc:
            raise LLMOpsError(f"{name} version {version} has no reference profile (versions "
                              f"registered by older llmops have none); register a new "
                              f"version") from exc

    def adopt_traffic(self, name: str, version: int, served: pd.DataFrame, why: str) -> None:
        """Record `served` (profiled traffic, column `SERVED`) as the traffic the version
        serves, what its live inputs are compared with from now on (`reference_profile`): the
        loop found it answers a drift as well as its golden set (a retrain the gate rejected
        would otherwise follow each cooldown). Beside the run's data; the tag says why."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / ADOPTED_FILE
            served.to_parquet(path, index=False)
            self.client.log_artifact(self._version(name, version).run_id, str(path), "data")
        self.tag_version(name, version, {ADOPTED_TAG: why[:5000]})

    def forget_traffic(self, name: str, version: int) -> None:
        """Compare the version's inputs with its own profile again (what a benchmark does
        before each run)."""
        if ADOPTED_TAG in self._version(name, version).tags:
            self.client.delete_model_version_tag(name, str(version), ADOPTED_TAG)

    def models(self, through_client: bool = False) -> list[dict]:
        """Registered models with their versions, aliases and key holdout metrics, read
        without the MLflow client where the store allows it (`training/catalogue.py`)."""
        listed = None if through_client else catalogue.read(self.tracking_uri,
                                                            self.config.timeout_s)
        if listed is not None:
            return listed
        self.check()
        client, out = self.client, []
        for rm in client.search_registered_models():
            versions = client.search_model_versions(f"name='{rm.name}'")
            out.append(catalogue.entry(
                rm.name, [(int(v.version), v.run_id) for v in versions], rm.aliases or {},
                {v.run_id: client.get_run(v.run_id).data.metrics for v in versions if v.run_id}))
        return sorted(out, key=lambda m: m["name"])


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "peft", "mlflow")] + [
        "pandas<3", "llmops"]

