"""Generation on a replica without Serve: rows of one `generate` are answered by their own LoRA
adapters, and the continuous batch (`serve_apps/engine.py`) answers each request as that
request alone would be, by the base or by its own adapter, whatever shares its steps."""

import asyncio
import gc
import threading

import pytest

from serve_apps.adapters import BASE_ROW
from serve_apps.engine import ContinuousEngine
from serve_apps.model import LoadedModel
from serve_apps.model_config import GenerationConfig
from serve_apps.slot import ModelSlot, Variants
from training.refs import ModelIdentity


@pytest.fixture(scope="module")
def wide_lm():
    """A 1-layer GPT-2 with a BPE tokenizer trained here (as a causal LM's), its weights drawn
    wide, so the next token is never a near tie that float rounding in a packed batch could
    flip (as in a trained model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from training.data import generate
    from training.models import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(list(generate("moderation", "base", 200, seed=0).text), 400)
    torch.manual_seed(0)
    return LoadedModel(ModelIdentity("lm", "1"), GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=16, n_layer=1, n_head=2,
        initializer_range=1.0, eos_token_id=tokenizer.eos_token_id)).eval(), tokenizer,
        {"kind": "generator"})


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


def test_the_continuous_batch_answers_as_one_generate_per_text(wide_lm):
    """Concurrent requests joining the engine at different moments, with different lengths and
    stop sequences, each get what `LoadedModel.generate` gives their text alone; a stream joins
    to the same text; a stream left early leaves the engine."""
    tiny_lm = wide_lm
    texts = [f"message {i} " + "word " * (i % 5) for i in range(12)]
    stops = [[], ["e"], ["wor", "ss"]]
    want = [tiny_lm.generate([t], 6 + i % 4, 0.0, 0, stops[i % 3])[0] for i, t in enumerate(texts)]

    async def use():
        engine = ContinuousEngine(tiny_lm, GenerationConfig(max_batch_tokens=64, kv_cache_tokens=2048))
        try:
            async def one(i: int) -> dict:
                await asyncio.sleep(0.005 * (i % 6))  # in pairs, while others decode
                return await engine.generate(texts[i], 6 + i % 4, stops[i % 3])

            got = await asyncio.gather(*(one(i) for i in range(len(texts))))
            streamed = [p async for p in engine.stream(texts[4], 6, stops[1], 30)]
            long = engine.stream(texts[0], 4000, [], 30)
            early = [await anext(long) for _ in range(2)]
            await long.aclose()  # the caller left
            return got, streamed, early, engine.active
        finally:
            await engine.close()

    async def impatient() -> ContinuousEngine:
        slot = ModelSlot(None, Variants(tiny_lm))
        with pytest.raises(TimeoutError):  # a caller that gives up while the engine starts...
            await asyncio.wait_for(slot.engine(tiny_lm), 0.001)
        engine = await slot.engine(tiny_lm)  # ...has not cancelled it for the next one
        assert (await engine.generate(texts[0], 6, []))["text"] == want[0]["text"]
        await engine.close()

    asyncio.run(impatient())
    got, streamed, early, active = asyncio.run(use())
    for g, w in zip(got, want):
        assert (g["text"], g["finish_reason"], g["prompt_tokens"], g["completion_tokens"]) == (
            w["text"], w["finish_reason"], w["prompt_tokens"], w["completion_tokens"])
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-4)
    assert max(g["batch_size"] for g in got) > 1  # they shared steps
    assert "".join(streamed) == want[4]["text"]
    assert len(early) == 2 and active == 0


def test_the_continuous_batch_answers_each_request_by_its_own_adapter(wide_lm):
    """Requests for two adapters and the base, joining the engine at different moments, each
    get what their adapter alone gives (`LoadedModel.generate` of their text); a stream by an
    adapter too; a per-batch generation by an adapter in another thread, between the steps,
    neither changes them nor is changed. Adapters nobody holds any more are detached at the
    next step, and the base answers without PEFT."""
    base = LoadedModel(wide_lm.identity, _fresh(wide_lm.model), wide_lm.tokenizer, wide_lm.meta)
    held = {"a": _lora(base.model, 1)[0], "b": _lora(base.model, 2)[0]}
    texts = [f"message {i} " + "word " * (i % 5) for i in range(12)]
    picks = [("a", None, "b")[i % 3] for i in range(12)]

    def alone(i: int, tokens: int, adapter: str | None) -> str:
        return base.generate([texts[i]], tokens, 0.0, 0, [], adapters=[held.get(adapter)])[0]["text"]

    want = [alone(i, 6 + i % 4, picks[i]) for i in range(12)]
    beside_want, plain = alone(2, 9, "b"), alone(1, 6, None)
    assert want[0] != alone(0, 6, None) and want[2] != alone(2, 8, None)  # they change answers
    steps, routed, per_token = [], [], base.adapters.per_token

    def recorded(names, padding=0):
        steps.append(set(names))
        routed.append(per_token(names, padding))
        return routed[-1]

    base.adapters.per_token = recorded

    async def use():
        engine = ContinuousEngine(base, GenerationConfig(max_batch_tokens=64, kv_cache_tokens=2048))
        try:
            async def one(i: int) -> str:
                await asyncio.sleep(0.005 * (i % 6))  # in pairs, while others decode
                return (await engine.generate(texts[i], 6 + i % 4, [], held.get(picks[i])))["text"]

            got, beside = await asyncio.gather(asyncio.gather(*(one(i) for i in range(12))),
                                               asyncio.to_thread(alone, 2, 9, "b"))
            streamed = [p async for p in engine.stream(texts[5], 6 + 5 % 4, [], 30, held["b"])]
            left = dict(engine.adapters)
            held.clear()  # nobody holds either adapter now
            gc.collect()
            after = (await engine.generate(texts[1], 6, []))["text"]
            return got, beside, "".join(streamed), left, after
        finally:
            await engine.close()

    got, beside, streamed, left, after = asyncio.run(use())
    assert got == want and beside == beside_want
    assert {"adapter-1-v1", "adapter-2-v1", BASE_ROW} in steps  # a step held all three
    # the stream's steps, its adapter's alone, ran PEFT's plain forward: no token routed
    assert {"adapter-2-v1"} in steps and [] in routed and any(routed)
    assert streamed == want[5]
    assert left == {}  # no request left in the engine holds an adapter
    assert after == plain and base.adapters.peft is None
    assert not any("lora" in name for name, _ in base.model.named_modules())


def test_the_prefill_gives_each_prompts_embedding_by_the_model_that_answers(wide_lm):
    """A request that asks for its prompt's embedding (the chat log's, for drift checks) gets
    what `embed_prompts` gives by the base or by its adapter, pooled from the prefill of the
    continuous batch (prompts split across steps too), beside requests that ask for none; a
    prompt longer than the model reads whole gets none (its caller embeds it)."""
    base = LoadedModel(wide_lm.identity, _fresh(wide_lm.model), wide_lm.tokenizer,
                       {**wide_lm.meta, "max_length": 120})
    adapter = _lora(base.model, 3)[0]
    texts = [" ".join(f"message {i} word" for i in range(n)) for n in (1, 9, 2, 30)]
    picks = [None, adapter, adapter, None]
    assert 64 < base.prompt_tokens(texts[1]) <= 120 < base.prompt_tokens(texts[3])
    want = [base.embed_prompts([t], [a])[0] for t, a in zip(texts, picks)]
    assert max(abs(x - y) for x, y in zip(want[1], base.embed_prompts([texts[1]])[0])) > 1e-3

    async def use():
        engine = ContinuousEngine(base, GenerationConfig(max_batch_tokens=64, kv_cache_tokens=2048))
        try:
            got = await asyncio.gather(*(engine.generate(t, 5, [], a, embed=i != 2)
                                         for i, (t, a) in enumerate(zip(texts, picks))))
            streams = []
            for i in (1, 3):
                streams.append([p async for p in engine.stream(texts[i], 5, [], 30, picks[i],
                                                               embed=True)])
            return got, streams, engine.pooled
        finally:
            await engine.close()

    got, streams, left = asyncio.run(use())
    for i in (0, 1):
        assert got[i]["embedding"] == pytest.approx(want[i], abs=1e-4)
    assert "embedding" not in got[2] and "embedding" not in got[3]
    # a stream: the embedding first (none for the prompt it cannot read whole), then the answer
    assert streams[0][0] == pytest.approx(want[1], abs=1e-4) and streams[1][0] is None
    assert ["".join(s[1:]) for s in streams] == [got[1]["text"], got[3]["text"]] and not left


def test_a_long_prompts_cache_pages_never_answer_another_adapters_request(wide_lm):
    """A prompt longer than a KV page (256 tokens) leaves complete pages that transformers
    shares with later prompts beginning alike; a page holds the keys and values one adapter
    computed. A generator serving adapters shares none, so the same long prompt gets the base's
    answer after the adapter's and the adapter's after the base's; one serving the base alone
    shares them (the same answers, from the cache)."""
    base = LoadedModel(wide_lm.identity, _fresh(wide_lm.model), wide_lm.tokenizer, wide_lm.meta)
    adapter = _lora(base.model, 1)[0]
    text = " ".join(f"message {i}" for i in range(150))
    assert base.prompt_tokens(text) > 300
    want = {name: base.generate([text], 6, 0.0, 0, [], adapters=[a])[0]["text"]
            for name, a in (("adapter", adapter), ("base", None))}
    assert want["adapter"] != want["base"]

    async def use(slot: ModelSlot, order: list) -> tuple[list, bool]:
        engine = await slot.engine(base)
        try:
            return ([(await engine.generate(text, 6, [], a))["text"] for a in order],
                    engine.manager.batch_processor.cache.use_prefix_sharing)
        finally:
            await engine.close()

    serving = ModelSlot(None, Variants(base), adapters={"a": adapter.identity})
    got, shared = asyncio.run(use(serving, [adapter, None, adapter]))
    assert got == [want["adapter"], want["base"], want["adapter"]] and not shared
    got, shared = asyncio.run(use(ModelSlot(None, Variants(base)), [None, None]))
    assert got == [want["base"]] * 2 and shared


def test_at_a_peak_a_generators_student_answers_in_the_continuous_batch(wide_lm):
    """A generator with a distilled student (`fallback`): a request a pipeline sends at a peak
    is answered by the student, as the student alone answers it, and says so; others by the
    champion."""
    import torch

    from serve_apps.deployments import Generator

    student = LoadedModel(ModelIdentity("lm", "2"), _fresh(wide_lm.model), wide_lm.tokenizer,
                          wide_lm.meta)
    with torch.no_grad():
        for weight in student.model.parameters():
            weight.mul_(-1.0)  # another model: other answers
    generator = Generator.func_or_class(None)
    generator.slot = ModelSlot(None, Variants(wide_lm, fallback=student),
                               GenerationConfig(max_new_tokens=6, stop=[]))
    text = "message 3 word word word"

    async def ask():
        try:
            return await asyncio.gather(generator.generate(text, "r1"),
                                        generator.generate(text, "r2", fallback=True))
        finally:
            for started in generator.slot.engines.values():
                await (await started).close()

    calm, peak = asyncio.run(ask())
    assert (calm["model"]["variant"], peak["model"]["variant"]) == ("champion", "fallback")
    assert peak["model"]["version"] == "2"
    assert calm["text"] == wide_lm.generate([text], 6, 0.0, 0, [])[0]["text"]
    assert peak["text"] == student.generate([text], 6, 0.0, 0, [])[0]["text"] != calm["text"]
