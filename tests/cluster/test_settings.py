"""One typed settings object: file, environment overrides, flags, and clear errors."""

import re

import pytest

from cluster.cli import main
from cluster.settings import SettingsError, load_settings
from monitoring.config import MonitoringConfig
from serve_apps.config import ServeConfig


def test_repo_settings_file_is_valid_and_matches_the_defaults():
    settings = load_settings("llmops.yaml", environ={})
    assert settings.training.deepspeed.stage == 2
    assert settings.training.tasks["support-router"].model.source == "all-MiniLM-L6-v2"
    assert settings.training.tasks["rewriter"].kind == "causal-lm"


def test_environment_overrides_the_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("training:\n  workers: 3\n  deepspeed: {stage: 1}\n")
    s = load_settings(f, environ={"LLMOPS_TRAINING__DEEPSPEED__STAGE": "3",
                                  "LLMOPS_DATA_DIR": "/tmp/x"})
    assert (s.training.workers, s.training.deepspeed.stage, str(s.data_dir)) == (3, 3, "/tmp/x")


def test_bare_yes_and_no_are_gpu_choices_not_booleans(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("serve:\n  use_gpu: yes\n")
    s = load_settings(f, environ={"LLMOPS_TRAINING__USE_GPU": "no"})
    assert (s.training.use_gpu, s.serve.use_gpu) == ("no", "yes")


def test_repo_settings_match_the_serving_defaults():
    s = load_settings("llmops.yaml", environ={})
    assert s.serve.moderation.generator.generation.stop == ["\n"]
    assert s.serve.moderation.classifier.model == "models:/moderation@champion"
    assert s.serve.support.classifier.batching.max_batch_size == 16
    assert s.serve.support.generator == ServeConfig().support.generator
    assert s.monitoring == MonitoringConfig()  # the commented file shows the real defaults


def test_task_override_keeps_the_other_task_defaults(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("training:\n  tasks:\n    support-router: {epochs: 5, model: {max_length: 32}}\n")
    task = load_settings(f, environ={}).training.tasks["support-router"]
    assert (task.epochs, task.model.max_length, task.model.source) == (5, 32, "all-MiniLM-L6-v2")
    assert task.dataset == "support-tickets"


@pytest.mark.parametrize("text, fragment", [
    ("training:\n  wokers: 2\n", "training.wokers: unknown key"),
    ("training:\n  deepspeed: {stage: 7}\n", "training.deepspeed.stage"),
    ("registry:\n  tracking_uri: ftp://x\n", "tracking_uri"),
    ("training: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("monitoring:\n  drift: {k: 4, n: 3}\n", "k (4) cannot exceed n (3)"),
    ("monitoring:\n  drift: {window: 100}\n", "min_rows (200) cannot exceed window (100)"),
    ("serve:\n  support: {min_reply_confidence: 2}\n", "min_reply_confidence"),
])
def test_bad_settings_name_the_key(tmp_path, text, fragment):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(fragment)):
        load_settings(f, environ={})


def test_unknown_environment_key_is_rejected():
    with pytest.raises(SettingsError, match="unknown key"):
        load_settings(environ={"LLMOPS_TRAINING__EPOCHZ": "2"})


def test_cli_config_flag_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("data_dirr: x\n")
    assert main(["models", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmops: error: {f}: data_dirr: unknown key"]
    assert main(["models", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read settings file" in capsys.readouterr().err
