"""The model deployments' shared machinery without Serve: one failing item of a batch fails
only its own request, a streamed generation stops when its reader leaves or stalls, and rows of
one batch are answered by their own LoRA adapters."""

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


def _lora(base, seed: int):
    """A LoRA adapter of `base` with random (non-zero) weights, as `fetch` reads one: its
    config and its weights in PEFT's saved form; and the same adapter merged into a copy of
    the base, the reference its answers must match."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from serve_apps.adapters import Adapter

    config = LoraConfig(r=4, lora_alpha=256, target_modules=["c_attn", "c_fc"],
                        init_lora_weights=False)  # large: they change the answers
    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(base), config)
    weights = {k: v.clone() for k, v in get_peft_model_state_dict(peft).items()}
    identity = ModelIdentity(f"adapter-{seed}", "1", base="models:/lm/1")
    return Adapter(identity, config, weights), peft.merge_and_unload().eval()


def test_rows_of_one_batch_are_answered_by_their_own_adapters(tiny_lm):
    """A batch mixing two adapters and the base gives each row what its adapter, merged into
    the base alone, gives; a stream by an adapter too. An adapter nobody holds any more is
    detached at the next batch, and the last one detached leaves the plain base."""
    import gc

    from serve_apps.model import LoadedModel

    base = LoadedModel(tiny_lm.identity, _fresh(tiny_lm.model), tiny_lm.tokenizer, tiny_lm.meta)
    (a, merged_a), (b, merged_b) = _lora(base.model, 1), _lora(base.model, 2)
    assert a.key != b.key
    texts = ["the first post", "a second one", "and a third"]
    args = dict(max_new_tokens=6, temperature=0.0, seed=0, stop=[])

    def alone(model, text: str) -> str:
        return LoadedModel(base.identity, model, base.tokenizer, base.meta).generate(
            [text], **args)[0]["text"]

    plain = [alone(_fresh(tiny_lm.model), t) for t in texts]
    mixed = [r["text"] for r in base.generate(texts, **args, adapters=[a, None, b])]
    assert mixed == [alone(merged_a, texts[0]), plain[1], alone(merged_b, texts[2])]
    assert mixed[0] != plain[0] and mixed[2] != plain[2]  # the adapters change the answers
    streamed = "".join(base.stream(texts[2], 6, 0.0, 0, [], 30, threading.Event(), adapter=b))
    assert streamed == mixed[2]
    assert set(base.adapters.attached) == {a.key, b.key}
    del a
    gc.collect()
    assert base.generate(texts[:1], **args, adapters=[b])[0]["text"] == alone(merged_b, texts[0])
    assert set(base.adapters.attached) == {b.key}  # `a` was dropped: detached
    del b
    gc.collect()
    assert [r["text"] for r in base.generate(texts, **args)] == plain
    assert base.adapters.peft is None  # no adapter left: the base runs without PEFT
    assert not any("lora" in name for name, _ in base.model.named_modules())


def _fresh(model):
    import copy

    return copy.deepcopy(model)
