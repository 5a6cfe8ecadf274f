"""Real Ray Train + DeepSpeed fine-tunes (tiny models) registered in a real MLflow registry."""

import json
import os
import signal
import time
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HEAVY, TINY_LLAMA, imported_by, lora_adapter, tiny_llama_folder

from serve_apps.model import load
from training import lora
from training.calibration import Calibration
from training.config import TaskConfig
from training.errors import InvalidData, LLMOpsError
from training.job import fit_and_register, make_spec, register_model_dir
from training.models import encode_causal_lm, predict_proba, train_bpe_tokenizer
from training.priors import weights
from training.prompts import prompt_of
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
    # holdouts, the golden set, and the temperature fitted on the validation rows
    assert set(first.metrics) == {"base", "new-product", "golden", "calibration"}
    assert {"accuracy", "macro_f1", "ece", "ece_uncalibrated", "f1_billing"} <= set(
        first.metrics["base"])
    fitted = first.metrics["calibration"]
    assert fitted["rows"] == len(data.validation) and fitted["temperature"] != 1.0

    # Loading by alias predicts bit-identically to the consolidated trained weights, at the
    # registered temperature.
    texts = list(data.holdouts["base"].text)
    run = registry.client.get_run(first.run_id)
    model, tokenizer, meta = load_hf(Path(first.model_dir))
    assert meta["calibration"]["temperature"] == fitted["temperature"]
    assert len(meta["calibration"]["scores"]) == fitted["rows"]
    # the generator's labels are wrong at a known rate: the sets are sized for the true ones
    assert meta["calibration"]["label_noise"] == settings.training.tasks[
        "support-router"].label_noise > 0
    assert np.array(meta["calibration"]["probs"]).shape == (fitted["rows"], len(meta["labels"]))
    expected = predict_proba(model, tokenizer, texts, meta["max_length"],
                             temperature=fitted["temperature"])
    loaded = mlflow.pyfunc.load_model("models:/support-router@champion")
    got = loaded.predict(pd.DataFrame({"text": texts}))
    assert np.array_equal(got[[f"prob_{c}" for c in meta["labels"]]].to_numpy(), expected)
    assert loaded.metadata.signature is not None
    # Served with an error rate, each answer carries its conformal set; a singleton is the
    # answer's own label.
    served = load("models:/support-router@champion", registry.tracking_uri).classify(texts, 0.2)
    assert [s["confidence"] for s in served] == pytest.approx(list(expected.max(axis=1)), abs=1e-5)
    assert all(set(s["candidates"]) <= set(meta["labels"]) for s in served)
    assert all(s["candidates"] == [s["label"]] for s in served if len(s["candidates"]) == 1)
    assert "candidates" not in load("models:/support-router@champion",
                                    registry.tracking_uri).classify(texts[:1])[0]
    # answers adjusted to new priors get sets sized for the shifted mix: the calibration rows
    # (stored with their labels) weighted by q(y) / p(y) (`Calibration.under`)
    assert len(meta["calibration"]["targets"]) == fitted["rows"]
    ratios = {label: 3.0 if i == 0 else 0.5 for i, label in enumerate(meta["labels"])}
    q = Calibration.of(meta).under(weights(meta["labels"], ratios)).threshold(0.2)
    assert q != Calibration.of(meta).threshold(0.2)
    for answer in load("models:/support-router@champion", registry.tracking_uri).classify(
            texts, 0.2, priors=ratios):
        scores = answer["scores"]
        assert {k for k, p in scores.items() if p >= 1 - q + 1e-5} <= set(answer["candidates"])
        assert not {k for k, p in scores.items() if p < 1 - q - 1e-5} & set(answer["candidates"])

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
    # Read from the SQLite store without the MLflow client: what the client lists.
    assert registry.models() == registry.models(through_client=True)


def test_llama_from_config_then_a_zero3_lora_adapter_resumed_after_a_worker_is_killed(
        ray_session, settings, registry, tmp_path):
    """A tiny Llama with a tokenizer trained here, fully fine-tuned with ZeRO 3 (weights
    sharded, consolidated to full ones; ZeRO 2 is above, 0 in test_cli.py), then a LoRA
    adapter over the registered version: only the adapter trains, is checkpointed (a killed
    worker resumes from it) and is registered, tagged with its base."""
    settings.training.tasks["rewriter"].model.architecture = TINY_LLAMA
    settings.training.deepspeed.stage = 3
    _, base = _train(settings, registry, "rewriter")
    assert base.metrics["base"]["perplexity"] > 1
    assert registry.client.get_run(base.run_id).data.params["deepspeed_stage"] == "3"
    files = {p.name for p in Path(base.model_dir).iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    settings.training.tasks["rewriter-lora"] = TaskConfig.model_validate({
        **settings.training.tasks["rewriter"].model_dump(), "method": "lora", "epochs": 3,
        "learning_rate": 1e-2, "model": {"source": "models:/rewriter@champion", "max_length": 64},
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}})
    marker = tmp_path / "killed"

    def kill_once(rank: int, epoch: int) -> None:
        """SIGKILL worker 1 once, after epoch 1's checkpoint has been taken."""
        if rank == 1 and epoch == 1 and not marker.exists():
            marker.touch()
            # three of Ray Train's polls of its workers: the checkpoint is recorded by then
            time.sleep(3 * float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]))
            os.kill(os.getpid(), signal.SIGKILL)

    _, adapter = _train(settings, registry, "rewriter-lora", after_epoch=kill_once)
    assert marker.exists()
    assert [h["epoch"] for h in adapter.history] == [1, 2, 3]
    assert [h["resumed_from_epoch"] for h in adapter.history] == [0, 1, 1]
    # ZeRO 3's checkpoint: the adapter's weights (sharded), nothing of the frozen base
    [states] = sorted(Path(adapter.model_dir).parent.glob(
        "checkpoint_*/state/zero_pp_rank_0_mp_rank_00_model_states.pt"))[-1:]
    saved = torch.load(states, map_location="cpu", weights_only=False)
    assert saved["module"] and all(".lora_" in name for name in saved["module"])
    assert saved["frozen_param_shapes"] is None

    assert (adapter.model, adapter.version, adapter.alias) == ("rewriter-lora", 1, "champion")
    history = adapter.history[-1]
    assert 0 < history["trainable_params"] < 0.05 * history["params"]
    assert adapter.history[-1]["val_loss"] < adapter.history[0]["val_loss"]
    tags = registry.client.get_model_version("rewriter-lora", "1").tags
    assert tags["llmops.base"] == "models:/rewriter/1"  # the alias, pinned to its version
    files = {p.name for p in Path(adapter.model_dir).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # no copy of the base

    # Loaded through MLflow as any client would: the adapter on its base, deterministic.
    model = mlflow.pyfunc.load_model("models:/rewriter-lora@champion")
    toxic = pd.DataFrame({"text": ["Are you all idiots? my uploads fail every single time!"]})
    a = model.predict(toxic, params={"max_new_tokens": 12})
    assert a.text[0] == model.predict(toxic, params={"max_new_tokens": 12}).text[0]
    assert 0 < a.confidence[0] <= 1

    # An adapter is not a base to train on (full or LoRA).
    settings.training.tasks["rewriter-lora"].model.source = "models:/rewriter-lora/1"
    with pytest.raises(InvalidData, match="is a LoRA adapter"):
        make_spec(settings.training, registry, "rewriter-lora",
                  build_task_data(settings.training, "rewriter-lora"))


def test_an_adapter_over_a_local_folder_is_tagged_with_its_digest_and_refused_once_it_changes(
        settings, registry, tmp_path):
    """A user's own base folder, identified by the digest of its files (the adapter here has
    random weights: what registration records is tested, the fine-tune above)."""
    base = tiny_llama_folder(tmp_path / "base", settings)
    settings.training.tasks["rewriter"] = TaskConfig.model_validate({
        **settings.training.tasks["rewriter"].model_dump(), "method": "lora",
        "model": {"source": str(base), "max_length": 64}, "lora": {"rank": 4}})
    version = register_model_dir(settings.training, registry, "rewriter",
                                 build_task_data(settings.training, "rewriter"),
                                 lora_adapter(base, str(base), tmp_path / "adapter"), [],
                                 history=[], ds_config={}, started=time.perf_counter()).version
    tags = registry.client.get_model_version("rewriter", str(version)).tags
    assert tags["llmops.base"] == str(base)
    assert tags["llmops.base_sha256"] == lora.folder_digest(base)
    assert registry.load_model("rewriter", str(version)).model is not None

    # A base whose files changed since is refused, not silently used.
    (base / "config.json").write_text((base / "config.json").read_text() + " ")
    with pytest.raises(lora.BaseMismatch, match="changed since"):
        registry.load_model("rewriter", str(version))


def test_lora_settings_fail_before_any_worker_starts(settings, registry, tmp_path):
    rewriter = settings.training.tasks["rewriter"].model_dump()
    with pytest.raises(ValueError, match="pretrained base"):
        TaskConfig.model_validate({**rewriter, "method": "lora"})  # its source is scratch
    with pytest.raises(ValueError, match="causal language models"):
        TaskConfig.model_validate({**settings.training.tasks["moderation"].model_dump(),
                                   "method": "lora", "model": {"source": str(tmp_path)}})
    base = tiny_llama_folder(tmp_path / "base", settings)
    data = build_task_data(settings.training, "rewriter")
    settings.training.tasks["rewriter"] = TaskConfig.model_validate({
        **rewriter, "method": "lora", "model": {"source": str(base)},
        "lora": {"target_modules": ["q_proj", "c_attn"]}})
    with pytest.raises(LLMOpsError, match=r"\['c_attn'\] are not layers.*q_proj"):
        make_spec(settings.training, registry, "rewriter", data)
    settings.training.tasks["rewriter"].model.source = "some-org/some-model"
    with pytest.raises(LLMOpsError, match="model.source 'some-org/some-model' is a Hugging Face"):
        make_spec(settings.training, registry, "rewriter", data)


def test_ray_trains_controller_loads_no_model_stack_for_a_fine_tune():
    """It unpickles the function `TorchTrainer` runs (its spec is an object reference): only
    the workers import torch, transformers and DeepSpeed."""
    assert imported_by("from training.finetune import train_loop") & HEAVY == set()


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


def test_a_tokenizer_with_a_chat_template_frames_prompts_in_training_and_serving_alike():
    tokenizer = train_bpe_tokenizer(["Message: hello there\nRewrite: hi", "<|user|> ok"], 300)
    plain = encode_causal_lm(tokenizer, ["hello there"], ["hi"], 64)[0]
    assert prompt_of(tokenizer, "hello there") == "Message: hello there\nRewrite:"
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    framed = prompt_of(tokenizer, "hello there")
    assert framed == "<|user|> hello there\n<|assistant|>"
    row = encode_causal_lm(tokenizer, ["hello there"], ["hi"], 64)[0]
    prompt_ids = tokenizer(framed, add_special_tokens=False)["input_ids"]
    assert row["input_ids"][:len(prompt_ids)] == prompt_ids != plain["input_ids"][:len(prompt_ids)]
    assert row["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)  # the prompt is not learnt
