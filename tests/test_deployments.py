"""The model deployments' shared machinery without Serve: one failing item of a batch fails
only its own request, and a streamed generation stops when its reader leaves or stalls."""

import asyncio
import threading
import time

import pytest

from monitoring.batching import unwrap
from serve_apps.deployments import Item, ModelSlot, Variants
from serve_apps.http import InvalidRequest
from serve_apps.model import LoadedModel
from training.refs import ModelIdentity


def _model(version: str) -> LoadedModel:
    return LoadedModel(ModelIdentity("m", version), model=None, tokenizer=None, meta={})


def test_one_failing_item_fails_only_its_own_request():
    """Items of one batch, grouped by their params: the group holding a text the model cannot
    take is run again item by item; every other item is answered."""
    calls = []

    def run(model, texts, params):
        calls.append(list(texts))
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
    def run(model, texts, params):
        if model.identity.version == "2":
            raise RuntimeError("the challenger broke")
        return [{"label": "ok"} for _ in texts]

    from serve_apps.config import CanaryConfig

    canary = CanaryConfig(model="models:/m/2", fraction=1.0, shadow=True)
    slot = ModelSlot(None, Variants(_model("1"), _model("2"), canary))
    [result] = asyncio.run(slot.run([Item("a", "r1")], run))
    assert result["label"] == "ok" and "shadow" not in result


@pytest.fixture(scope="module")
def tiny_lm():
    """A 1-layer GPT-2 with random weights and the bundled encoder's tokenizer (no EOS token,
    so it generates until stopped)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from training.config import BUNDLED_ENCODER
    from training.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(BUNDLED_ENCODER))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=8192,
                                       n_embd=16, n_layer=1, n_head=2)).eval()
    return LoadedModel(ModelIdentity("lm", "1"), model, tokenizer, {"kind": "generator"})



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


def test_inline_stages_answer_like_their_deployment_handles(tiny_lm):
    """Deployment classes inside the pipeline replica, called as their handles would be: loaded
    by the pipeline's `reconfigure()`, awaited answers (sync methods too, raising when awaited),
    a stream its caller can cancel."""
    from serve_apps.stages import Stages

    encoder = Stages({"Encoder": None}, None)
    generator = Stages({"Generator": None}, None)["Generator"]
    generator.model.slot.variants = Variants(tiny_lm)  # what reconfigure() would load

    async def use() -> tuple:
        await encoder.reconfigure({"models": {"Encoder": {"model": "all-MiniLM-L6-v2"}}})
        embedded = await encoder["Encoder"].predict_many.remote([Item("hello", "r1")])
        identity = await encoder["Encoder"].identity.remote()
        refused = generator.params.remote(seed=-1)  # raises when awaited, as a handle's would
        with pytest.raises(InvalidRequest, match="32-bit"):
            await refused
        stream = generator.options(stream=True).stream.remote("hello", "r3", max_new_tokens=4000)
        pieces = [await anext(stream) for _ in range(3)]
        stream.cancel()  # the caller left: the generation stops
        await asyncio.sleep(0.5)
        return embedded, identity, pieces

    [embedded], identity, pieces = asyncio.run(use())
    assert embedded["embedding"].shape == (384,) and embedded["model"]["version"] == "bundled"
    assert identity["champion"]["name"] == "all-MiniLM-L6-v2"
    assert pieces[0]["model"]["variant"] == "champion" and all("text" in p for p in pieces[1:])
    generating = lambda: [t for t in threading.enumerate() if t.name.endswith("(run)")]  # noqa: E731
    deadline = time.monotonic() + 5
    while generating() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not generating()  # the generation thread (`stream_text`'s) ended


def test_placement_puts_cpu_models_inline_and_gpu_models_in_replicas():
    from serve_apps.apps import app_deployments
    from serve_apps.config import ServeConfig

    cfg = ServeConfig.model_validate({"support": {
        "autoscaling": {"min_replicas": 1, "max_replicas": 3},
        "encoder": {"model": "all-MiniLM-L6-v2", "placement": "replica",
                    "resources": {"num_cpus": 0.5, "memory_mb": 100}}}})
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
    gpu = app_deployments("support", ServeConfig().support, 0.1, True, None, pin_models=False)
    assert set(gpu) == {"SupportPipeline", "Classifier", "Encoder", "Generator"}
    assert "user_config" not in gpu["SupportPipeline"]
    assert gpu["Classifier"]["ray_actor_options"]["num_gpus"] == 0.25
