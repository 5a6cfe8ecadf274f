"""The registry's catalogue (models, versions, aliases, key holdout metrics) read without the
MLflow client, whose import and store start-up take 2-3 s: the embedded SQLite store is read
directly (read-only), an MLflow server through its REST API (the credentials and TLS settings
of MLflow's own environment variables). `Registry.models` uses it and falls back to the client
for any other store, or when the SQLite schema is not the one read here."""

from __future__ import annotations

import base64
import json
import math
import os
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from training.errors import RegistryUnavailable

KEY_METRICS = ("_macro_f1", "_perplexity")
_PROMPT_TAG = "mlflow.prompt.is_prompt"  # prompts share the registry; MLflow lists them apart
_DELETED = "Deleted_Internal"  # MLflow's SQL store marks a deleted version this way
_WORKSPACE = "default"


def entry(name: str, versions: Iterable[tuple[int, str | None]], aliases: dict[str, int],
          metrics: dict[str, dict[str, float]]) -> dict:
    """One model of the catalogue: `versions` as (version, run id), `metrics` by run id."""
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    return {"name": name, "aliases": {a: int(v) for a, v in aliases.items()},
            "versions": [{"version": v, "aliases": sorted(by_version.get(v, [])), "run_id": run,
                          "metrics": {k: round(x, 4) for k, x in metrics.get(run or "", {}).items()
                                      if k.endswith(KEY_METRICS)}}
                         for v, run in sorted(versions)]}


def read(tracking_uri: str, timeout_s: float) -> list[dict] | None:
    """The catalogue sorted by model name, or None where only the MLflow client can read it."""
    if tracking_uri.startswith("sqlite:///"):
        try:
            return _sqlite(Path(tracking_uri.removeprefix("sqlite:///")))
        except sqlite3.Error:  # another schema (an MLflow upgrade): the client knows it
            return None
    if tracking_uri.startswith(("http://", "https://")):
        return _rest(tracking_uri.rstrip("/"), timeout_s)
    return None


def _sqlite(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        names = [n for (n,) in db.execute(
            "SELECT name FROM registered_models WHERE workspace = ? AND name NOT IN "
            "(SELECT name FROM registered_model_tags WHERE workspace = ? AND key = ? "
            "AND lower(value) = 'true') ORDER BY name", (_WORKSPACE, _WORKSPACE, _PROMPT_TAG))]
        out = []
        for name in names:
            versions = db.execute(
                "SELECT version, run_id FROM model_versions WHERE workspace = ? AND name = ? "
                "AND (current_stage IS NULL OR current_stage != ?)",
                (_WORKSPACE, name, _DELETED)).fetchall()
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases "
                                      "WHERE workspace = ? AND name = ?", (_WORKSPACE, name)))
            metrics: dict[str, dict[str, float]] = {}
            for run, key, value, is_nan in db.execute(
                    "SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN "
                    "(SELECT run_id FROM model_versions WHERE workspace = ? AND name = ?)",
                    (_WORKSPACE, name)):
                metrics.setdefault(run, {})[key] = math.nan if is_nan else value
            out.append(entry(name, [(int(v), r) for v, r in versions], aliases, metrics))
    return out


def _rest(url: str, timeout_s: float) -> list[dict]:
    def get(path: str, **query) -> dict:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}?"
                                         f"{urllib.parse.urlencode(query)}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s, context=context) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:
            raise RegistryUnavailable(f"MLflow at {url} answered {exc.code} {exc.reason} to "
                                      f"{path}") from None
        except (OSError, ValueError) as exc:
            raise RegistryUnavailable(f"MLflow at {url} is unreachable: {exc}") from None

    headers = _auth()
    context = _tls() if url.startswith("https://") else None
    models, token = [], ""
    while True:
        page = get("registered-models/search", max_results=1000,
                   **({"page_token": token} if token else {}))
        models += page.get("registered_models", [])
        if not (token := page.get("next_page_token")):
            break
    out = []
    for model in sorted(models, key=lambda m: m["name"]):
        versions = get("model-versions/search", filter=f"name='{model['name']}'",
                       max_results=10000).get("model_versions", [])
        metrics = {v["run_id"]: {m["key"]: m["value"] for m in get(
            "runs/get", run_id=v["run_id"])["run"]["data"].get("metrics", [])}
            for v in versions if v.get("run_id")}
        aliases = {a["alias"]: int(a["version"]) for a in model.get("aliases", [])}
        out.append(entry(model["name"], [(int(v["version"]), v.get("run_id")) for v in versions],
                         aliases, metrics))
    return out


def _auth() -> dict[str, str]:
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _tls() -> ssl.SSLContext:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # the operator's explicit MLflow setting
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))
