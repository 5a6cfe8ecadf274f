"""Bad input: one clear error, a non-zero exit in the CLI, and nothing half-registered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, register_quick

from serve_apps.config import TlsConfig
from serve_apps.tls import check
from training.errors import InvalidData, RegistryUnavailable, UnknownName
from training.job import fit_and_register
from training.registry import Registry
from training.taskdata import TaskData, build_task_data


def _fit(settings, registry, data, task="support-router"):
    return fit_and_register(settings.training, registry, task, data,
                            storage_path=settings.storage_path, use_gpu=False)


def _versions(registry) -> int:
    return len(registry.client.search_model_versions())


def test_unknown_task_and_scenario(settings, registry):
    with pytest.raises(UnknownName, match="unknown task 'sentiment'"):
        build_task_data(settings.training, "sentiment")
    with pytest.raises(UnknownName, match="unknown scenario 'winter'"):
        build_task_data(settings.training, "support-router", "winter")


def test_empty_dataset_is_rejected_before_training(settings, registry):
    data = build_task_data(settings.training, "support-router")
    data = TaskData(data.train.iloc[:0], data.validation, data.holdouts)
    with pytest.raises(InvalidData, match="empty"):
        _fit(settings, registry, data)
    assert _versions(registry) == 0


def test_label_missing_from_training_data_is_rejected(settings, registry):
    data = build_task_data(settings.training, "support-router")
    data = TaskData(data.train[data.train.label != "security"], data.validation, data.holdouts)
    with pytest.raises(InvalidData, match=r"\['security'\] never occur"):
        _fit(settings, registry, data)
    assert _versions(registry) == 0


def test_unreachable_mlflow_fails_fast_and_registers_nothing(settings):
    unreachable = settings.registry.model_copy(update={"tracking_uri": "http://127.0.0.1:9",
                                                       "timeout_s": 2})
    with pytest.raises(RegistryUnavailable, match="127.0.0.1:9 is unreachable"):
        _fit(settings, Registry(unreachable, settings.data_dir),
             build_task_data(settings.training, "support-router"))
    assert not Path(settings.storage_path).exists()  # no training was started


def test_failed_alias_rolls_back_the_new_version(settings, registry, monkeypatch):
    """Registration is what fails here: the model is trained in-process (a fine-tune on Ray
    Train registers through the same `register_model_dir`)."""
    from mlflow.tracking import MlflowClient

    def refuse(self, *args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(RuntimeError, match="registry went away"):
        register_quick(settings, registry, "moderation", epochs=1)
    monkeypatch.undo()
    assert _versions(registry) == 0


def _cli(*args, data_dir, env=None):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("args, code, fragment", [
    (["train", "sentiment"], 2, "unknown task 'sentiment'"),
    (["train", "support-router", "--scenario", "winter"], 2, "unknown scenario 'winter'"),
    (["train", "moderation", "sentiment"], 2, "unknown task 'sentiment'"),
    (["train", "moderation", "rewriter", "--resume", "r"], 2, "train one task"),
    (["distill", "sentiment"], 2, "unknown task 'sentiment'"),
    (["train", "support-router", "--mlflow-uri", "http://127.0.0.1:9"], 3, "unreachable"),
    (["models", "--mlflow-uri", "gopher://x"], 2, "tracking_uri"),
    (["tls", "dev-cert", "--days", "0"], 2, "--days must be at least 1"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, code, fragment):
    proc = _cli(*args, data_dir=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert fragment in lines[-1] and lines[-1].startswith("llmops: error:")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_dev_cert_then_up_checks_the_files_before_starting_anything(tmp_path):
    """`llmops tls dev-cert` prints settings that load; `llmops up` with a key of another
    certificate stops at one line naming serve.tls before Ray or Serve starts."""
    proc = _cli("tls", "dev-cert", "--out", str(tmp_path / "tls"), "--host", "api.example",
                "--json", data_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tls = TlsConfig.model_validate(json.loads(proc.stdout)["tls"])
    check(tls)
    env = {**os.environ, "LLMOPS_SERVE__TLS__CERTFILE": tls.ca_certs,
           "LLMOPS_SERVE__TLS__KEYFILE": tls.keyfile,
           "LLMOPS_RAY__DASHBOARD_PORT": str(free_port())}
    proc = _cli("up", data_dir=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("llmops: error: serve.tls: cannot load certfile")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "serve_config.yaml").exists()


def test_cli_status_with_nothing_up_is_one_line(tmp_path):
    """No dashboard answers (a port nothing listens on): one line, exit 2, no traceback."""
    env = {**os.environ, "LLMOPS_RAY__DASHBOARD_PORT": str(free_port())}
    proc = _cli("status", data_dir=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("llmops: error: no Ray dashboard at http://127.0.0.1:")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
