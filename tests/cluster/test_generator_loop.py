"""The loop for a generator (the rewriter) against a real MLflow registry and the session's Ray:
reviewers' corrected answers become its retraining set, the retrain is a real Ray job that
fine-tunes the champion on them beside a replay of its training rows, and the gate judges the
challenger by token-level F1 of its answers on the held-out corrections and the golden set."""

import pytest
from conftest import (
    TINY_GPT2,
    lora_adapter,
    register_quick,
    tiny_llama_folder,
    tiny_settings,
    wait_for,
)

from cluster.controller import Controller
from monitoring.config import LogConfig
from monitoring.drift import check_model
from monitoring.log import FEEDBACK, INFERENCE, SegmentWriter, now
from training.config import RetrainConfig
from training.data import generate
from training.errors import InvalidData
from training.evaluate import GENERATION_METRIC, token_f1
from training.features import descriptors, prompt_embeddings
from training.registry import CHAMPION, REFERENCE_FILE, Registry
from training.retrain import ORIGINAL, RECENT, generation_retraining_data
from training.taskdata import TaskData

MODEL = "rewriter"


@pytest.fixture
def rewriter(ray_session, tmp_path):
    """A rewriter champion (v1) trained on the base scenario's posts, and the loop's settings
    on the session's Ray."""
    settings = tiny_settings(tmp_path / "state")
    settings.ray.dashboard_port = int(ray_session.dashboard.rsplit(":", 1)[1])
    settings.training.use_gpu = "no"
    settings.training.retrain = RetrainConfig(min_labelled=40, replay_rows=300,
                                              validation_rows=16, recent_repeats=3)
    task = settings.training.tasks[MODEL]
    # wide enough to learn the base scenario's rewrites (token F1 about 0.6) in seconds; a
    # drift profile of 450 held-out prompts (toxic posts come from few templates: with 200,
    # clean windows' descriptors read as drift)
    settings.training.tasks[MODEL] = task.model_copy(update={
        "train_size": 300, "epochs": 8, "holdout_size": 250,
        "model": task.model.model_copy(update={
            "architecture": {**TINY_GPT2, "n_embd": 64}})})
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, MODEL, epochs=8)
    return settings, registry, Controller(settings, MODEL, registry)


def log_chat(settings, n: int, corrected: int, seed: int = 5, scenario: str = "new-product",
             registry=None, distinct: bool = False) -> list[str]:
    """What the chat application logs for `n` prompts (posts of `scenario`, each once if
    `distinct`) the champion answered (its real answers where `registry` is given), and
    reviewers' corrections (the reference rewrites) of the first `corrected`."""
    from training.prompts import prompt_of

    df = generate("moderation", scenario, 2 * n if distinct else n, seed=seed,
                  priors={"toxic": 1.0})
    df = df.drop_duplicates("text").sample(n=n, random_state=seed).reset_index(drop=True) \
        if distinct else df
    champion = registry and registry.load_model(MODEL, 1)
    outputs = list(champion.predict(None, df[["text"]]).text) if champion else [None] * n
    embedded = prompt_embeddings(champion.model, champion.tokenizer, list(df.text),
                                 champion.meta["max_length"]).tolist() if champion else [None] * n
    ts = now()
    SegmentWriter(settings.log_uri, INFERENCE, LogConfig()).write_segment([
        {"request_id": f"c{seed}-{i}", "item": 0, "ts": ts, "tenant": "default",
         "application": "chat", "model": MODEL, "model_version": "1", "variant": "champion",
         "stages": {"generator": f"{MODEL}/1"}, "prediction": "stop", "confidence": 0.5,
         "latency_ms": 20.0, "outcome": "ok", "text": text, "output": outputs[i],
         "embedding": embedded[i],
         **(descriptors(text, len(champion.tokenizer(prompt_of(champion.tokenizer, text),
                                                     add_special_tokens=False)["input_ids"]))
            if champion else {})} for i, text in enumerate(df.text)])
    SegmentWriter(settings.log_uri, FEEDBACK, LogConfig()).write_segment([
        {"request_id": f"c{seed}-{i}", "item": 0, "label": None, "correction": df.rewrite[i],
         "ts": ts, "tenant": "default"} for i in range(corrected)])
    return list(df.rewrite[:corrected])


def log_canary(settings, n: int) -> None:
    """Both sides' answers over a canary (a share of them corrected): the champion's
    rewrites need whole new words, the challenger's are kept as they were."""
    df = generate("moderation", "new-product", n, seed=8, priors={"toxic": 1.0})
    rows, corrections, ts = [], [], now()
    for version, side in (("1", "champion"), ("2", "challenger")):
        for i, (text, rewrite) in enumerate(zip(df.text, df.rewrite)):
            rid = f"k{side}-{i}"
            output = rewrite if side == "challenger" else "I I I I I I"
            rows.append({"request_id": rid, "item": 0, "ts": ts, "tenant": "default",
                         "application": "chat", "model": MODEL, "model_version": version,
                         "variant": side, "prediction": "stop", "confidence": 0.5,
                         "latency_ms": 20.0, "outcome": "ok", "text": text, "output": output})
            if i < 40:
                corrections.append({"request_id": rid, "item": 0, "label": None,
                                    "correction": rewrite, "ts": ts, "tenant": "default"})
    SegmentWriter(settings.log_uri, INFERENCE, LogConfig()).write_segment(rows)
    SegmentWriter(settings.log_uri, FEEDBACK, LogConfig()).write_segment(corrections)


def test_token_f1_credits_shared_words_whatever_their_order_and_case():
    assert token_f1("I disagree with you.", "i DISAGREE with you") == 1.0
    assert token_f1("with you I disagree", "I disagree with you") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "something") == 0.0
    assert token_f1("I disagree", "I disagree with you") == pytest.approx(2 * 2 / (2 + 4))
    assert token_f1("go away", "please stay") == 0.0


def test_a_generator_retrains_on_corrected_answers_and_the_gate_scores_its_words(rewriter):
    settings, registry, controller = rewriter
    corrections = log_chat(settings, 90, 72, distinct=True)
    state = controller.retrain_now()
    assert state.state == "retraining" and "corrected held out" in \
        controller.events()[-1]["reason"]
    data = TaskData.load(controller.work / state.retrain_id / "data")
    # the corrections learnt (repeated) or held out, never both, beside the champion's rows
    learnt = data.train[data.train[RECENT].eq(True)]
    held = data.holdouts[RECENT]
    assert set(learnt.rewrite) | set(held.rewrite) <= set(corrections)
    assert len(learnt) > learnt.text.nunique() and not set(learnt.text) & set(held.text)
    assert len(held) == round(72 * settings.training.retrain.recent_holdout_share)
    replay = data.train[~data.train[RECENT].eq(True)]
    assert set(replay.text) <= set(registry.run_data(MODEL, 1, REFERENCE_FILE).text)
    assert len(data.holdouts[ORIGINAL]) == len(data.golden) == 32

    settings.controller.interval_s = 1.0
    state = wait_for("the retrain job and the gate", lambda: (
        s := controller.step()).state not in ("retraining", "evaluating") and s, 600, every_s=2)
    gate = state.detail["gate"]
    assert gate["metric"] == GENERATION_METRIC
    # fine-tuned on the corrections, it writes the new product's rewrites much more like them
    # (+0.46 of token F1 here), and forgets little of the old (-0.002 on the golden set)
    assert gate["challenger"][RECENT] > gate["champion"][RECENT] + 0.2, gate
    assert state.state == "canary" and state.challenger == 2, state
    assert registry.client.get_model_version(MODEL, "2").tags["llmops.gate"] == "accepted"
    assert registry.alias_version(MODEL, CHAMPION) == 1
    # the canary: the challenger's answers need fewer words corrected than the champion's
    log_canary(settings, settings.controller.canary.min_requests)
    state = controller.step()
    assert state.state == "promoting", state
    sides = state.detail["canary"]
    assert sides["challenger"]["accuracy"] == 1.0 > 0.2 > sides["champion"]["accuracy"]
    state = controller.step()
    assert state.state == "serving" and state.champion == 2, state
    assert registry.alias_version(MODEL, CHAMPION) == 2
    assert [e["to"] for e in controller.events()] == [
        "retraining", "evaluating", "canary", "promoting", "serving"]


def test_a_generators_drift_is_its_prompts_wording_and_its_corrected_answers_words(rewriter):
    """Against its profile (its held-out prompts' wording and embeddings, its answers to them
    beside their references), clean prompts and their corrected answers hold; a new product's
    prompts read as new to the generator, and its answers lose words, which its reviewers'
    corrections say."""
    settings, registry, _ = rewriter
    profile = registry.reference_profile(MODEL, 1)
    assert profile.prediction.isna().all() and profile.output.notna().all()
    config = settings.monitoring.drift.model_copy(update={"k": 1, "n": 1})  # 500 a window
    log_chat(settings, 500, 60, seed=3, scenario="base", registry=registry)
    [clean] = check_model(settings.log_uri, registry, config, MODEL).windows
    drop = {m.name: m for m in clean.metrics}["feedback_quality_drop"]
    assert not clean.drifted and clean.labelled == 60, clean
    assert {m.name for m in clean.metrics} == {"share_of_drifted_descriptors", "embedding_drift",
                                               "feedback_quality_drop"}
    log_chat(settings, 500, 60, seed=4, registry=registry)
    [drifted] = check_model(settings.log_uri, registry, config, MODEL).windows
    moved = {m.name: m for m in drifted.metrics}
    assert drifted.drifted and moved["feedback_quality_drop"].drifted, drifted
    assert moved["feedback_quality_drop"].value > drop.value + 0.2
    # the new product's prompts mean something else to the generator
    assert moved["embedding_drift"].drifted, drifted


def test_a_generator_retrain_needs_enough_corrections(rewriter):
    settings, registry, controller = rewriter
    log_chat(settings, 30, 12)
    recent = generate("moderation", "new-product", 12, seed=5, priors={"toxic": 1.0})
    with pytest.raises(InvalidData, match="12 corrected answers.*needs 40.*correction"):
        generation_retraining_data(recent.assign(correction=recent.rewrite),
                                   registry.run_data(MODEL, 1, REFERENCE_FILE),
                                   recent, settings.training.retrain)
    state = controller.state()
    after = controller.retrain.start(state, "drift")
    assert after.state == "serving" and "12 corrected answers" in after.detail["waiting"]


def test_a_lora_tasks_retrain_trains_a_new_adapter_on_its_champions_exact_base(tmp_path):
    """The champion of a LoRA task is an adapter: its retrain starts from the base version the
    adapter was trained on, even after the base's alias moved on; a full task's from the
    champion's own weights."""
    import time

    import yaml

    from training.job import register_model_dir
    from training.refs import reference
    from training.registry import download_hf_model
    from training.taskdata import build_task_data

    settings = tiny_settings(tmp_path / "state")
    settings.training.tasks = {**settings.training.tasks, "rewriter-lora": {
        "dataset": "moderation", "kind": "causal-lm", "label_priors": {"toxic": 1.0},
        "method": "lora", "model": {"source": "models:/rewriter@champion", "max_length": 64},
        "train_size": 48, "holdout_size": 16, "golden_size": 16, "holdouts": ["base"]}}
    registry = Registry(settings.registry, settings.data_dir)

    def register(task: str, folder) -> int:
        return register_model_dir(settings.training, registry, task,
                                  build_task_data(settings.training, task), folder, [],
                                  history=[], ds_config={}, started=time.perf_counter()).version

    base = register(MODEL, tiny_llama_folder(tmp_path / "base", settings))
    adapter = register("rewriter-lora", lora_adapter(
        download_hf_model(reference(MODEL, base)), reference(MODEL, base), tmp_path / "a", 1))
    moved = register(MODEL, tiny_llama_folder(tmp_path / "base-2", settings))
    registry.set_alias(MODEL, CHAMPION, moved)  # the base's alias moves on
    lora = Controller(settings, "rewriter-lora", registry).retrain
    assert lora.source(adapter) == reference(MODEL, base)
    written = yaml.safe_load(lora.c.job_settings(tmp_path / "job", lora.source(adapter))
                             .read_text())["training"]["tasks"]["rewriter-lora"]
    assert written["method"] == "lora" and written["model"]["source"] == reference(MODEL, base)
    assert Controller(settings, MODEL, registry).retrain.source(base) == reference(MODEL, base)

