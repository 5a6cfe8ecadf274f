"""Real Ray Train + DeepSpeed fine-tunes (tiny models) registered in a real MLflow registry."""

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from training.finetune import Chaos
from training.job import fit_and_register
from training.models import predict_proba
from training.pyfunc import load_hf
from training.taskdata import build_task_data
from training.tune import tune_task


def _train(settings, registry, task, **kwargs):
    data = build_task_data(settings.training, task)
    return data, fit_and_register(settings.training, registry, task, data,
                                  storage_path=settings.storage_path, use_gpu=False, **kwargs)


def test_two_worker_zero2_finetune_registers_champion_then_a_resumed_challenger(
        ray_session, settings, registry):
    data, first = _train(settings, registry, "support-router")
    assert (first.model, first.version, first.alias) == ("support-router", 1, "champion")
    assert [h["epoch"] for h in first.history] == [1, 2]
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert set(first.metrics) == {"base", "new-product", "golden"}  # holdouts + the golden set
    assert {"accuracy", "macro_f1", "ece", "f1_billing"} <= set(first.metrics["base"])

    # Loading by alias predicts bit-identically to the consolidated trained weights.
    texts = list(data.holdouts["base"].text)
    run = registry.client.get_run(first.run_id)
    model, tokenizer, meta = load_hf(Path(first.model_dir))
    expected = predict_proba(model, tokenizer, texts, meta["max_length"])
    loaded = mlflow.pyfunc.load_model("models:/support-router@champion")
    got = loaded.predict(pd.DataFrame({"text": texts}))
    assert np.array_equal(got[[f"prob_{c}" for c in meta["labels"]]].to_numpy(), expected)
    assert loaded.metadata.signature is not None

    # The run records lineage: datasets with digests, DeepSpeed config, git commit, epochs.
    inputs = run.inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} >= {"support-tickets:base",
                                                "support-tickets-holdout:new-product"}
    assert all(d.dataset.digest for d in inputs)
    ds_config = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=first.run_id, artifact_path="deepspeed_config.json")).read())
    assert ds_config["zero_optimization"]["stage"] == 2
    assert run.data.tags["git_commit"]
    history = registry.client.get_metric_history(first.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]

    # A rerun with `resume` continues after the last epoch of the first run (one more here)
    # and registers the next version as the challenger.
    settings.training.tasks["support-router"].epochs = 3
    second = fit_and_register(settings.training, registry, "support-router", data,
                              storage_path=settings.storage_path, use_gpu=False,
                              resume=Path(first.model_dir).parent.name)
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert [h["resumed_from_epoch"] for h in second.history] == [0, 0, 2]
    assert (second.version, second.alias) == (2, "challenger")
    [listing] = [m for m in registry.models() if m["name"] == "support-router"]
    assert listing["aliases"] == {"champion": 1, "challenger": 2}
    assert "base_macro_f1" in listing["versions"][0]["metrics"]


def test_zero3_shards_consolidate_to_full_weights(ray_session, settings, registry):
    """Stage 3 shards the weights too (stage 2 is above, stage 0 in test_cli.py)."""
    stage = settings.training.deepspeed.stage = 3
    _, result = _train(settings, registry, "moderation")
    assert result.version == 1
    run = registry.client.get_run(result.run_id)
    assert run.data.params["deepspeed_stage"] == str(stage)
    out = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"text": ["hi there"]}))
    assert out.label[0] in {"safe", "toxic", "spam", "pii"}
    assert abs(out.filter(like="prob_").to_numpy().sum() - 1) < 1e-5


def test_causal_lm_rewriter_registers_and_generates_deterministically(ray_session, settings,
                                                                        registry):
    _, result = _train(settings, registry, "rewriter")
    assert result.alias == "champion"
    assert result.metrics["base"]["perplexity"] > 1
    model = mlflow.pyfunc.load_model("models:/rewriter@champion")
    toxic = pd.DataFrame({"text": ["Are you all idiots? my uploads fail every single time!"]})
    a = model.predict(toxic, params={"max_new_tokens": 12})
    b = model.predict(toxic, params={"max_new_tokens": 12})
    assert isinstance(a.text[0], str) and a.text[0] == b.text[0]
    assert 0 < a.confidence[0] <= 1 and a.confidence[0] == b.confidence[0]


def test_resumes_from_checkpoint_after_a_worker_is_killed(ray_session, settings, registry, tmp_path):
    settings.training.tasks["support-router"].epochs = 3
    chaos = Chaos(kill_rank=1, after_epoch=1, marker=str(tmp_path / "killed"))
    _, result = _train(settings, registry, "support-router", chaos=chaos)
    assert (tmp_path / "killed").exists()
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1, 1]
    assert result.version == 1


def test_tune_searches_and_registers_the_best_trial(ray_session, settings, registry):
    tune = settings.tune.model_copy(update={"trials": 2, "learning_rates": [1e-3, 1e-5],
                                            "epochs": [1], "concurrent_trials": 2})
    settings.training.workers = 1  # the two trials' trainers run side by side on two CPUs
    result = tune_task(settings.training, tune, registry, "moderation",
                       storage_path=settings.storage_path, use_gpu=False)
    assert result.alias == "champion"
    params = registry.client.get_run(result.run_id).data.params
    assert params["tune_trials"] == "2"
    assert float(params["learning_rate"]) in {1e-3, 1e-5}
