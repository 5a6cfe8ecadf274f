"""`llmops train --json`, `llmops models --json` and `llmops lineage` end to end, as a user runs
them."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import HEAVY, imported_by


def _llmops(*args, config, ray_address):
    env = {**os.environ, "LLMOPS_RAY__ADDRESS": ray_address, "LLMOPS_TRAINING__USE_GPU": "no"}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env=env)


def test_train_json_then_models_json(ray_session, settings, tmp_path):
    config = tmp_path / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    proc = _llmops("train", "moderation", "--epochs", "1", "--deepspeed-stage", "0", "--workers",
                   "1", "--json", config=config, ray_address=ray_session.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert (result["model"], result["version"], result["alias"]) == ("moderation", 1, "champion")
    assert set(result["metrics"]["base"]) >= {"accuracy", "macro_f1", "ece", "f1_spam"}
    assert [h["epoch"] for h in result["history"]] == [1]
    assert "epoch 1/1 step" in proc.stderr  # progress is visible

    proc = _llmops("models", "--json", config=config, ray_address=ray_session.address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [model] = json.loads(proc.stdout)["models"]
    assert model["name"] == "moderation" and model["aliases"] == {"champion": 1}
    assert model["versions"][0]["run_id"] == result["run_id"]

    # the fine-tune's OpenLineage events: generated data in, the registered version out
    proc = _llmops("lineage", "moderation@champion", "--json", config=config,
                   ray_address=ray_session.address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chain = json.loads(proc.stdout)
    run = chain["trained_by"]
    assert chain["model"] == "models:/moderation/1" and run["state"] == "COMPLETE"
    assert run["job"] == "train.moderation" and run["outputs"][0]["name"] == "models:/moderation/1"
    train_size = settings.training.tasks["moderation"].train_size
    assert {"name": f"moderation/base/seed-{settings.training.seed}", "namespace": "generator",
            "rows": train_size,
            "description": "training rows"} in run["inputs"]
    assert chain["served"]["requests"] == 0 and chain["deployed"] == [] and chain["from"] == []
    proc = _llmops("lineage", "moderation", config=config, ray_address=ray_session.address)
    assert proc.returncode == 2 and proc.stderr.startswith("llmops: error: name a model version")


_LOADED = """
import json, sys
from cluster.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
open(sys.argv[1], "w").write(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("argv", [["--help"], ["drift", "check", "--help"], ["models", "--json"]])
def test_light_commands_import_no_model_stack(settings, tmp_path, argv):
    """Commands that read or print load neither torch, the model libraries nor MLflow (the
    registry listing reads the store itself): a second, not ten, on a small machine."""
    config = tmp_path / "llmops.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", _LOADED, str(out), *argv, "--config",
                           str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    assert set(json.loads(out.read_text())) & HEAVY == set()


@pytest.mark.parametrize("module", ["monitoring.monitor", "cluster.controller", "cluster.loop"])
def test_the_loop_imports_no_model_stack_until_it_uses_one(module):
    assert imported_by(f"import {module}") & HEAVY == set()
