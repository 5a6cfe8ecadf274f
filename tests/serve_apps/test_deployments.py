"""The model deployments' shared machinery without Serve: one failing item of a batch fails
only its own request, a streamed generation stops when its reader leaves or stalls, and a
pipeline whose models all have replicas of their own loads no model library (generation
itself: test_generation_engine.py)."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import HEAVY, imported_by

from monitoring.batching import unwrap
from serve_apps.batch import Item
from serve_apps.http import InvalidRequest
from serve_apps.model import LoadedModel
from serve_apps.slot import ModelSlot, Variants
from training.refs import ModelIdentity


def _model(version: str) -> LoadedModel:
    return LoadedModel(ModelIdentity("m", version), model=None, tokenizer=None, meta={})


def test_one_failing_item_fails_only_its_own_request():
    """Items of one batch, grouped by their params: the group holding a text the model cannot
    take is run again item by item; every other item is answered."""
    calls = []

    def run(model, items, params):
        texts = [it.text for it in items]
        calls.append(texts)
        if any("poison" in t for t in texts):
            raise ValueError("the model cannot take this text")
        return [{"label": t.upper()} for t in texts]

    slot = ModelSlot(None, Variants(_model("1")))
    items = [Item("a", "r1"), Item("poison", "r2"), Item("b", "r3"), Item("c", "r4", (("x", 1),))]
    results = asyncio.run(slot.run(items, run))
    assert [r["label"] if isinstance(r, dict) else type(r) for r in results] == [
        "A", ValueError, "B", "C"]
    assert results[0]["model"] == {"name": "m", "version": "1", "alias": None,
                                   "variant": "champion"}
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"], ["c"]]
    with pytest.raises(ValueError, match="cannot take"):
        unwrap(results[1])


def test_a_failing_shadow_never_fails_the_answer():
    def run(model, items, params):
        if model.identity.version == "2":
            raise RuntimeError("the challenger broke")
        return [{"label": "ok"} for _ in items]

    from serve_apps.model_config import CanaryConfig

    canary = CanaryConfig(model="models:/m/2", fraction=1.0, shadow=True)
    slot = ModelSlot(None, Variants(_model("1"), _model("2"), canary))
    [result] = asyncio.run(slot.run([Item("a", "r1")], run))
    assert result["label"] == "ok" and "shadow" not in result


def test_at_a_peak_the_fallback_answers_every_item_canary_or_not():
    """But an adapter's: a student distils the model, not the adapters served over it."""
    from serve_apps.adapters import Adapter
    from serve_apps.model_config import CanaryConfig

    def run(model, items, params):
        return [{"label": model.identity.version, "adapter": it.adapter is not None}
                for it in items]

    canary = CanaryConfig(model="models:/m/2", fraction=1.0)
    slot = ModelSlot(None, Variants(_model("1"), _model("2"), canary, fallback=_model("3")))
    tuned = Adapter(ModelIdentity("m-lora", "1", base="models:/m/1"), None, {})
    calm, peak, own = asyncio.run(slot.run([Item("a", "r1"), Item("b", "r2", fallback=True),
                                            Item("c", "r3", adapter=tuned, fallback=True)], run))
    assert (calm["label"], calm["model"]["variant"]) == ("2", "challenger")
    assert (peak["label"], peak["model"]["variant"]) == ("3", "fallback")
    assert (own["label"], own["adapter"]) == ("1", True)
    # no fallback loaded: a peak item is answered as any other
    slot = ModelSlot(None, Variants(_model("1")))
    [item] = asyncio.run(slot.run([Item("b", "r2", fallback=True)], run))
    assert item["model"]["variant"] == "champion"


def test_a_stream_left_early_stops_its_generation(tiny_lm):
    before = threading.active_count()
    cancel = threading.Event()
    pieces = tiny_lm.stream("hello there", 4000, 0.0, 0, [], 30, cancel)
    assert [next(pieces) for _ in range(3)]
    started = time.monotonic()
    cancel.set()  # what the Generator deployment does when its caller goes away
    pieces.close()
    while threading.active_count() > before and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert threading.active_count() == before  # the generation thread ended
    assert time.monotonic() - started < 5  # long before 4,000 tokens


def test_a_stalled_stream_ends_with_a_timeout(tiny_lm, monkeypatch):
    """A generation that produces nothing for `piece_timeout_s` ends the stream with an error
    instead of holding its reader forever."""
    import transformers

    real = transformers.GPT2LMHeadModel.generate

    def stalled(self, *args, streamer=None, **kwargs):
        time.sleep(2)  # a stuck forward pass
        return real(self, *args, streamer=streamer, **kwargs)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "generate", stalled)
    pieces = tiny_lm.stream("hello", 8, 0.0, 0, [], 0.3, threading.Event())
    with pytest.raises(TimeoutError, match="no generated piece within 0.3 s"):
        list(pieces)


def test_inline_stages_answer_like_their_deployment_handles(ray_session, tiny_lm):
    """Deployment classes inside the pipeline replica, called as their handles would be: loaded
    by the pipeline's `reconfigure()`, awaited answers (sync methods too, raising when awaited),
    a stream its caller can cancel. (`identity()` reads the replica's GPUs from Ray.)"""
    import torch

    from serve_apps.stages import Stages

    encoder = Stages({"Encoder": None}, None)
    generator = Stages({"Generator": None}, None)["Generator"]
    generator.model.slot.variants = Variants(tiny_lm)  # what reconfigure() would load

    async def use() -> tuple:
        threads = torch.get_num_threads()
        try:  # `resources.threads`: the replica's (here the pipeline's) forward passes
            await encoder.reconfigure({"models": {"Encoder": {"model": "all-MiniLM-L6-v2",
                                                              "threads": threads + 1}}})
            embedded = await encoder["Encoder"].predict_many.remote([Item("hello", "r1")])
            identity = await encoder["Encoder"].identity.remote()
        finally:
            torch.set_num_threads(threads)
        assert identity["threads"] == threads + 1
        refused = generator.params.remote(seed=-1)  # raises when awaited, as a handle's would
        with pytest.raises(InvalidRequest, match="32-bit"):
            await refused
        stream = generator.options(stream=True).stream.remote("hello", "r3", max_new_tokens=4000)
        pieces = [await anext(stream) for _ in range(3)]
        engine = await generator.model.slot.engine(tiny_lm)
        running = engine.active
        stream.cancel()  # the caller left: the generation stops
        await asyncio.sleep(0.5)
        left = engine.active
        await engine.close()
        return embedded, identity, pieces, running, left

    [embedded], identity, pieces, running, left = asyncio.run(use())
    assert embedded["embedding"].shape == (384,) and embedded["model"]["version"] == "bundled"
    assert identity["champion"]["name"] == "all-MiniLM-L6-v2"
    assert pieces[0]["model"]["variant"] == "champion" and all("text" in p for p in pieces[1:])
    assert (running, left) == (1, 0)  # the stream was in the continuous batch, then left it


def test_placement_puts_cpu_models_inline_and_gpu_models_in_replicas():
    """And the settings that change in place (peak fallback, breaker, overload) are in the
    pipeline's options, not in the args its replicas are built with."""
    from serve_apps.apps import app_deployments, pipeline_config
    from serve_apps.config import BreakerConfig, ChatAppConfig, ServeConfig, SupportAppConfig

    cfg = ServeConfig.model_validate({"support": {
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "encoder": {"model": "all-MiniLM-L6-v2", "placement": "replica",
                    "resources": {"num_cpus": 0.5, "memory_mb": 100, "threads": 3}}}})
    default = app_deployments("support", ServeConfig().support, 0.1, False, None,
                              pin_models=False)  # `auto`: a generator keeps a process of its own
    assert set(default) == {"SupportPipeline", "Generator"}
    assert set(default["SupportPipeline"]["user_config"]["models"]) == {"Classifier", "Encoder"}
    cfg.support.generator.placement = "inline"
    cpu = app_deployments("support", cfg.support, 0.1, False, None, pin_models=False)
    assert set(cpu) == {"SupportPipeline", "Encoder"}
    pipeline = cpu["SupportPipeline"]
    assert set(pipeline["user_config"]["models"]) == {"Classifier", "Generator"}
    assert pipeline["ray_actor_options"]["num_cpus"] == pytest.approx(0.1 + 0.25 + 0.25)
    assert pipeline["autoscaling_config"]["max_replicas"] == 3  # the inline models scale with it
    assert cpu["Encoder"]["ray_actor_options"]["memory"] == 100 * 2**20
    # torch's threads: set by the replica's reconfigure (in place), Ray's where unset
    assert cpu["Encoder"]["user_config"]["threads"] == 3
    assert "threads" not in default["Generator"]["user_config"]
    gpu = app_deployments("support", ServeConfig().support, 0.1, True, None, pin_models=False)
    assert set(gpu) == {"SupportPipeline", "Classifier", "Encoder", "Generator"}
    # what changes in place is in the pipeline's user_config and options, never in its args
    live = gpu["SupportPipeline"]["user_config"]
    assert live == {"pressure": None, "breaker": BreakerConfig().model_dump(mode="json")}
    cfg.support.classifier.fallback = {"model": "models:/support-router@fallback",
                                       "enter_ongoing": 8, "exit_ongoing": 2}
    cfg.support.overload.max_queued_requests = 7
    fallback = app_deployments("support", cfg.support, 0.1, True, None, pin_models=False)
    assert fallback["SupportPipeline"]["user_config"]["pressure"]["enter_ongoing"] == 8
    assert fallback["SupportPipeline"]["max_queued_requests"] == 7
    args = pipeline_config(cfg.support)
    assert "breaker" not in args and "overload" not in args
    assert "fallback" not in args["classifier"] and args["classifier"]["model"]
    assert SupportAppConfig.model_validate(args).classifier.fallback is None
    assert gpu["Classifier"]["ray_actor_options"]["num_gpus"] == 0.25
    # a generator's student: loaded by the generator's replicas, kept out of the pipeline's args,
    # and only where the classifier's switch keeps generating at a peak
    student = {"model": "models:/support-reply@fallback"}
    with pytest.raises(ValueError, match="generation: keep"):
        cfg.support.generator = cfg.support.generator.model_copy(update={"fallback": student})
        SupportAppConfig.model_validate(cfg.support.model_dump())
    cfg.support.classifier.fallback.generation = "keep"
    both = app_deployments("support", SupportAppConfig.model_validate(cfg.support.model_dump()),
                           0.1, True, None, pin_models=False)
    inline = both["SupportPipeline"]["user_config"]["models"]  # placement inline, above
    assert inline["Generator"]["fallback"]["model"] == student["model"]
    assert "fallback" not in pipeline_config(cfg.support)["generator"]
    # chat has no classifier: its generator's fallback is the switch, thresholds and all
    chat = ChatAppConfig.model_validate({"generator": {
        "model": "models:/rewriter@champion", "placement": "replica",
        "fallback": {"model": "models:/rewriter@fallback", "enter_ongoing": 6,
                     "exit_ongoing": 2}}})
    deployments = app_deployments("chat", chat, 0.1, False, None, pin_models=False)
    assert deployments["ChatPipeline"]["user_config"]["pressure"]["enter_ongoing"] == 6
    assert deployments["Generator"]["user_config"]["fallback"]["model"] == \
        "models:/rewriter@fallback"
    assert "fallback" not in pipeline_config(chat)["generator"]
    assert app_deployments("chat", ChatAppConfig(), 0.1, False, None, pin_models=False)[
        "ChatPipeline"]["user_config"]["pressure"] is None
    with pytest.raises(ValueError, match="chat answers nothing without its generator"):
        ChatAppConfig.model_validate({"generator": {"model": "models:/rewriter@champion",
                                                    "fallback": {**student,
                                                                 "generation": "skip"}}})


def _verdict(label: str, candidates: list[str] | None) -> dict:
    """A classifier's answer as `LoadedModel.classify` gives it (abstention on unless None)."""
    return {"label": label, "confidence": 0.5, "scores": {label: 0.5}, "tokens": 3,
            **({} if candidates is None else {"candidates": candidates,
                                               "abstained": len(candidates) != 1}),
            "model": {"name": "moderation", "version": "1", "alias": "champion",
                      "variant": "champion"}}


def test_unsure_classifiers_hold_the_post_or_send_the_ticket_to_review():
    """Abstention in the pipelines: moderation holds a post only when its candidates call for
    different actions; support routes an unsure ticket to the review queue, keeping the router's
    label; one candidate is an ordinary answer. At a peak whose fallback skips generation, a
    post to rewrite is hidden without a call to the generator."""
    from serve_apps.breaker import CircuitBreaker
    from serve_apps.config import ModerationAppConfig, SupportAppConfig
    from serve_apps.model_config import PeakFallbackConfig
    from serve_apps.moderation import ModerationPipeline
    from serve_apps.pressure import Pressure
    from serve_apps.support import SupportPipeline

    moderation = object.__new__(ModerationPipeline.func_or_class)
    moderation.config = ModerationAppConfig()
    reply = {"text": "we refunded you", "confidence": 0.9, "prompt_tokens": 1,
             "completion_tokens": 2, "model": {"name": "support-reply", "version": "1",
                                              "alias": "champion", "variant": "champion"}}

    def finish(label, candidates, peak=False):
        return asyncio.run(moderation._finish("call me on 555-867-5309", _verdict(
            label, candidates), "r1", peak))[0]

    held = finish("safe", ["safe", "spam"])
    assert (held.action, held.safe_text, held.abstained, held.flagged) == ("hold", None, True, True)
    assert finish("spam", []).action == "hold"  # no label fits: unsure too
    shown = finish("safe", ["safe", "pii"])  # either way shown, redacted
    assert (shown.action, shown.abstained, shown.flagged) == ("redact", True, False)
    assert "[PHONE]" in shown.safe_text
    sure = finish("spam", ["spam"])
    assert (sure.action, sure.abstained, sure.candidates) == ("block", False, ["spam"])
    assert finish("spam", None).abstained is False  # abstention off
    rewrites = []

    async def rewrite(text: str, rid: str, **options) -> dict:
        rewrites.append((text, options))
        return {**reply, "text": "a kind post", "model": {**reply["model"], "name": "rewriter"}}

    moderation.pressure = Pressure(PeakFallbackConfig(model="models:/moderation/2"))
    moderation.breaker = CircuitBreaker(moderation.config.breaker)
    moderation.generator = SimpleNamespace(generate=SimpleNamespace(remote=rewrite))
    hidden = finish("toxic", None, peak=True)
    assert (hidden.action, hidden.safe_text, "generator" in hidden.models) == ("block", None, False)
    assert rewrites == []
    calm = finish("toxic", None)
    assert (calm.action, calm.safe_text, calm.models["generator"].name) == (
        "rewrite", "a kind post", "rewriter")
    # the rewrite is asked with its prompt's embedding: it is logged as the generator's answer
    assert [options for _, options in rewrites] == [{"embed": True, "fallback": False}]
    # a peak that keeps generating asks the generator's student (where it has one)
    moderation.pressure = Pressure(PeakFallbackConfig(model="models:/moderation/2",
                                                      generation="keep"))
    assert finish("toxic", None, peak=True).action == "rewrite"
    assert rewrites[-1][1] == {"embed": True, "fallback": True}

    support = object.__new__(SupportPipeline.func_or_class)
    support.config = SupportAppConfig()
    unsure = support._result(_verdict("billing", ["billing", "refund"]), reply, None)
    assert (unsure.queue, unsure.label, unsure.abstained) == ("human-review", "billing", True)
    routed = support._result(_verdict("billing", ["billing"]), reply, None)
    assert (routed.queue, routed.abstained) == ("billing", False)


def test_a_pipeline_loads_torch_only_for_an_inline_model():
    """Its replica imports the model deployments (torch, transformers) only when a stage is
    inline: an ingress replica stays light (about 250 MB and 3 s less to start)."""
    apps = ", ".join(f"serve_apps.{app}" for app in
                     ("moderation", "support", "chat", "advisor", "feedback"))
    assert imported_by(f"import {apps}") & HEAVY == set()
    assert "torch" in imported_by("from serve_apps.stages import model_deployments\n"
                                  "model_deployments()")
