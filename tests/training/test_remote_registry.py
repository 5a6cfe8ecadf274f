"""The registry through a real MLflow tracking server, as on a cluster: `mlflow server` with a
database backend and an artifact root it serves over HTTP (`--serve-artifacts`), so the client
holds neither the database nor the artifacts, behind MLflow's basic authentication (the
controller and the replicas unpickle what it serves: nobody may write to it unauthenticated)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, register_quick, tiny_settings

from training.errors import RegistryUnavailable

ADMIN_PASSWORD = "a-long-test-password-for-the-admin"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback: SQLite backend (a database file standing for PostgreSQL) and
    a local artifact root standing for the object store; stopped with its workers at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    (root / "auth.ini").write_text(  # what cluster.yaml's head writes from its secrets
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n")  # one password hash per minute, not per request
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'backend.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri(), "--serve-artifacts"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
             "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
             "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-csrf-key"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except urllib.error.HTTPError as answered:  # up, and asking who is there
            if answered.code == 401:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url, root
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_models_registered_and_served_through_a_tracking_server(mlflow_server, tmp_path,
                                                               monkeypatch):
    from serve_apps.model import load
    from training.refs import resolve
    from training.registry import Registry

    url, server_root = mlflow_server
    search = f"{url}/api/2.0/mlflow/registered-models/search"
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(search, timeout=10)  # no credentials: nothing to read or write
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # what every node's env holds
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    settings = tiny_settings(tmp_path / "client", tracking_uri=url)
    registry = Registry(settings.registry, settings.data_dir)
    registry.check()

    first = register_quick(settings, registry, "moderation", epochs=2)
    second = register_quick(settings, registry, "moderation", epochs=2, seed=1)
    assert (first.alias, second.alias) == ("champion", "challenger")
    registry.set_alias("moderation", "champion", int(second.version))

    # What a Serve replica on another node does: resolve the alias and download the weights.
    identity = resolve("models:/moderation@champion", url)
    assert identity.version == str(second.version) != str(first.version)
    loaded = load("models:/moderation@champion", url)
    answers = loaded.classify(["you are an idiot", "see you at the meetup"])
    assert [a["label"] in loaded.meta["labels"] for a in answers] == [True, True]

    # A machine downloads a version once, whatever the reference or process asking; it keeps
    # the versions it used last (one here) and nothing else.
    import mlflow.artifacts

    from training import registry as registry_module

    monkeypatch.setattr(registry_module, "MODEL_CACHE", tmp_path / "models")
    monkeypatch.setattr(registry_module, "CACHED_VERSIONS", 1)
    downloads, download = [], mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts",
                        lambda **kw: downloads.append(kw) or download(**kw))
    folder = registry_module.download_hf_model("models:/moderation@champion")
    assert folder == registry_module.download_hf_model(f"models:/moderation/{second.version}")
    assert folder.is_relative_to(tmp_path / "models") and len(downloads) == 1
    older = registry_module.download_hf_model(f"models:/moderation/{first.version}")
    assert older != folder and len(downloads) == 2
    [kept] = (tmp_path / "models").iterdir()
    assert older.is_relative_to(kept) and not folder.exists()

    # The lineage and artifacts live with the server, nothing with the client.
    run = registry.client.get_run(first.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list((server_root / "artifacts").rglob("*.safetensors"))
    assert stored, "the model's weights are in the server's artifact root"
    assert not (settings.data_dir / "mlflow.db").exists()
    assert not (settings.data_dir / "artifacts").exists()
    assert registry.run_metrics("moderation", str(first.version))

    listed = subprocess.run([sys.executable, "-m", "cluster.cli", "models", "--mlflow-uri", url,
                             "--data-dir", str(tmp_path / "other"), "--json"],
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    # `llmops models` reads the catalogue through MLflow's REST API, with the operator's
    # credentials: the same listing as the MLflow client's, refused without them.
    [model] = json.loads(listed.stdout)["models"]
    assert model == registry.models(through_client=True)[0]
    assert model["aliases"]["champion"] == int(second.version)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(RegistryUnavailable, match="401"):
        registry.models()

