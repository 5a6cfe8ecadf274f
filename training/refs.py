"""Model references: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or the bundled encoder, and
the exact version one points at. Light to import (MLflow only when a reference is resolved):
the CLI's read-only commands and the deploy client use it without loading torch."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from training.config import BUNDLED_ENCODER
from training.errors import LLMOpsError

BASE_TAG = "llmops.base"  # an adapter version's exact base (`training.job.register_model_dir`)
RETRAIN_TAG = "llmops.retrain_id"  # on a version a retrain registered: which one
# on a version the loop adjusted to new class priors: what its answers are multiplied by
PRIOR_WEIGHTS_TAG = "llmops.prior_weights"  # JSON {label: new prior / training prior}
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class UnknownModel(LLMOpsError):
    """A model reference that names nothing in the registry."""

    status = 404


@dataclass(frozen=True)
class ModelIdentity:
    """Which model answered: name, exact version, the alias it was loaded through and, for a
    LoRA adapter, the exact base it was trained on (`models:/NAME/VERSION` or a folder)."""

    name: str
    version: str
    alias: str | None = None
    base: str | None = None

    @property
    def uri(self) -> str:
        return self.name if self.version == "bundled" else reference(self.name, self.version)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "base" or v is not None}


def reference(name: str, version: int | str | None = None, alias: str | None = None) -> str:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS`: the one way references are written."""
    if (version is None) == (alias is None):
        raise LLMOpsError("give exactly one of a version or an alias")
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"


def _parse(ref: str) -> re.Match:
    m = _REF.match(ref)
    if not m:
        raise UnknownModel(f"model reference {ref!r} is not models:/NAME@ALIAS, "
                           f"models:/NAME/VERSION or {BUNDLED_ENCODER!r}")
    return m


def model_name(ref: str) -> str:
    """The model a reference names (no registry lookup)."""
    return BUNDLED_ENCODER if ref == BUNDLED_ENCODER else _parse(ref)["name"]


def resolve(ref: str, tracking_uri: str | None) -> ModelIdentity:
    """The exact version a reference points at now; `UnknownModel` if there is none."""
    if ref == BUNDLED_ENCODER:
        return ModelIdentity(BUNDLED_ENCODER, "bundled")
    m = _parse(ref)
    mv = _model_version(m, ref, tracking_uri)
    return ModelIdentity(m["name"], str(mv.version), m["alias"], (mv.tags or {}).get(BASE_TAG))


def mlflow_version(ref: str, tracking_uri: str | None):
    """The MLflow model version a `models:/` reference names now (tags, run, source)."""
    return _model_version(_parse(ref), ref, tracking_uri)


def _model_version(m: re.Match, ref: str, tracking_uri: str | None):
    """The MLflow model version (with its tags) a parsed reference names now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(m["name"], m["alias"])
        return client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        raise UnknownModel(f"{ref} is not in the registry at {tracking_uri}") from exc


def recorded_priors(ref: str, tracking_uri: str | None) -> dict | None:
    """The class-prior adjustment the loop applied to the exact version `ref` names (after a
    label shift), as `reconfigure()` takes it; None when it serves its training priors."""
    m = _REF.match(ref)  # the bundled encoder has no versions
    if m is None or m["version"] is None:
        return None
    tag = (_model_version(m, ref, tracking_uri).tags or {}).get(PRIOR_WEIGHTS_TAG)
    weights = json.loads(tag) if tag else None
    return {"version": m["version"], "weights": weights} if weights else None


def pin(ref: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(`models:/NAME/VERSION` the reference points at now, the alias it was given by)."""
    identity = resolve(ref, tracking_uri)
    return identity.uri, identity.alias
