"""Continuous (iteration-level) batching of a generator's greedy answers, on CPUs as on GPUs.

transformers' `ContinuousBatchingManager` runs one step loop per loaded model, in a thread of
its own: a request joins the running batch at the next step (its prompt prefilled in chunks
beside the others' decoding, its KV cache in pages) and leaves it when it ends, so a short
answer never waits for a long one and concurrent streams share every forward pass. It replaces
one `generate` per `@serve.batch` batch, which held each request until the longest answer of
its batch ended and let no request join a batch already running.

Requests for different LoRA adapters of the model share the steps too: before each step, under
the model's lock (adapters are state of its modules, `serve_apps/adapters.py`), the step's
requests' adapters are attached and each token is routed to its request's adapter
(`AdapterHost.per_token`). The step loop runs that in Python before every forward pass, so the
engine runs without CUDA graphs (vLLM is the engine for GPUs, `engine: vllm`).

A request that asks for its prompt's embedding (the chat log's, for drift checks) gets it from
its own prefill: the decoder's last hidden states, summed over the prompt's tokens as the steps
run, pooled and projected as `training.features.prompt_embeddings` does, so no forward pass of
its own is needed.

What keeps the per-batch path (`LoadedModel.generate`): sampled requests (each runs alone, so
its seed alone decides its answer).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import threading
from collections.abc import AsyncIterator, Sequence

from serve_apps.adapters import Adapter
from serve_apps.model import LoadedModel, StopTrimmer, finished
from serve_apps.model_config import GenerationConfig
from training.prompts import Chat, prompt_of

PAGE = 256  # tokens per KV cache page


class ContinuousEngine:
    """One loaded causal LM's step loop; `generate` and `stream` are called on the replica's
    event loop, and their answers equal `LoadedModel.generate`'s for the same text and
    adapter."""

    def __init__(self, loaded: LoadedModel, settings: GenerationConfig,
                 share_prefixes: bool = False):
        """`share_prefixes`: complete KV pages of a prompt serve later prompts that begin alike
        (transformers' block sharing). Only where no request names an adapter: a page holds
        the keys and values one adapter computed, and would answer another's request."""
        from transformers import ContinuousBatchingConfig
        from transformers import GenerationConfig as Generation

        from training.features import embedded_tokens

        model, tokenizer = loaded.model, loaded.tokenizer
        self.loaded = loaded
        self.embed_length = embedded_tokens(model.config, loaded.meta.get("max_length"))
        self.tokenizer = copy.deepcopy(tokenizer)  # used on the event loop alone: no shared state
        self.model_config = model.config
        self.adapters: dict[str, Adapter] = {}  # by engine request id: requests that have one
        self.stepping: int | None = None  # the step loop's thread while a step runs
        self.routed: list = []  # the per-token adapter hooks of the running step
        eos = tokenizer.eos_token_id
        self.manager = model.init_continuous_batching(
            generation_config=Generation(do_sample=False, max_new_tokens=settings.max_new_tokens,
                                         eos_token_id=-1 if eos is None else eos,
                                         pad_token_id=tokenizer.pad_token_id),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=PAGE, num_blocks=max(1, math.ceil(settings.kv_cache_tokens / PAGE)),
                max_batch_tokens=settings.max_batch_tokens, return_logprobs=True,
                use_cuda_graph=False, use_async_batching=False,
                allow_block_sharing=share_prefixes))
        self.pooled: dict[str, _Pooled] = {}  # by engine request id: prompts being embedded
        self.step: list[tuple[str, int, int]] = []  # the step's (request id, first position, tokens)
        decoder = model.base_model  # its output's last hidden states are what prompts pool
        self.hooks = [model.register_forward_pre_hook(self._step_begins, with_kwargs=True),
                      model.register_forward_hook(self._step_ends, always_call=True),
                      *([decoder.register_forward_hook(self._pool)] if decoder is not model else [])]
        self.manager.start()
        self.ids = itertools.count()
        self.active = 0  # requests in the engine now

    def _step_begins(self, _model, _args, kwargs) -> None:
        """Before a step of this engine (not another caller's forward pass: those hold the
        model's lock already), take the lock and route each token to its request's adapter."""
        processor = getattr(self.manager, "batch_processor", None)
        if processor is None or kwargs.get("cache") is not processor.cache:
            return
        self.loaded.lock.acquire()
        self.stepping = threading.get_ident()
        requests = processor.inputs_and_outputs.requests_in_batch
        host = self.loaded.adapters
        _, names = host.prepare(self.loaded.model, [self.adapters.get(r.state.request_id)
                                                    for r in requests])
        if names is not None:  # some adapter is attached: every token says which one it takes
            tokens = [name for r, name in zip(requests, names) for _ in range(r.query_length)]
            self.routed = host.per_token(tokens, kwargs["input_ids"].shape[1] - len(tokens))
        # for `_pool`: where each request's tokens sit in the step's row, from which position
        positions = kwargs.get("position_ids")
        if self.pooled and positions is not None:
            positions, at = positions[0].tolist(), 0
            for r in requests:
                self.step.append((r.state.request_id, positions[at], r.query_length))
                at += r.query_length

    def _pool(self, _decoder, _args, output) -> None:
        """A step's last hidden states, summed over the prompt tokens of the requests that asked
        for their prompt's embedding: the prefill computes them anyway, so the embedding costs
        no forward pass of its own. A prompt's positions count only in order from 0, each once
        (a prefill split across steps adds up; one that restarts, or skips a shared prefix,
        leaves the sum incomplete, and the caller embeds the prompt itself)."""
        hidden = getattr(output, "last_hidden_state", None)
        if self.stepping != threading.get_ident() or not self.step or hidden is None:
            return
        hidden, at = hidden[0], 0
        for rid, first, count in self.step:
            pooled = self.pooled.get(rid)
            if pooled is not None and first == pooled.seen < pooled.length:
                n = min(count, pooled.length - first)
                pooled.total = pooled.total + hidden[at:at + n].float().sum(0)
                pooled.seen += n
            at += count

    def _step_ends(self, _model, _args, _output) -> None:
        if self.stepping != threading.get_ident():
            return
        for handle in self.routed:
            handle.remove()
        self.routed, self.step, self.stepping = [], [], None
        self.loaded.lock.release()

    def _submit(self, text: str | Chat, max_new_tokens: int, streaming: bool, adapter: Adapter | None,
                embed: bool = False) -> tuple[str, asyncio.Queue, int]:
        from training.models import token_budget

        limit, max_new_tokens = token_budget(self.model_config, max_new_tokens)
        whole = self.tokenizer(prompt_of(self.tokenizer, text), add_special_tokens=False)["input_ids"]
        prompt = whole[-limit:]
        rid, outputs = f"g{next(self.ids)}", asyncio.Queue()
        if adapter is not None:
            self.adapters[rid] = adapter
        # as prompt_embeddings reads it; a conversation's is its last user message's (a Chat)
        if embed and isinstance(text, str) and len(whole) <= min(limit, self.embed_length):
            self.pooled[rid] = _Pooled(len(prompt))
        self.manager.register_result_handler(rid, outputs.put_nowait)
        self.manager.add_request(prompt, request_id=rid, max_new_tokens=max_new_tokens,
                                 streaming=streaming)
        self.active += 1
        return rid, outputs, len(prompt)

    async def generate(self, text: str | Chat, max_new_tokens: int, stop: Sequence[str],
                       adapter: Adapter | None = None, embed: bool = False) -> dict:
        """The answer to `text` by `adapter` (None: the base), as `LoadedModel.generate` gives
        it; with `embed`, also its prompt's embedding by the model that answered (as
        `LoadedModel.embed_prompts` gives it) where the prefill gave all of it (else none)."""
        rid, outputs, prompt_tokens = self._submit(text, max_new_tokens, False, adapter, embed)
        done = False
        try:
            out = _checked(await outputs.get())
            done = True
        finally:
            pooled = self.pooled.pop(rid, None)
            self._leave(rid, done)
        tokens = out.generated_tokens
        answer = finished(self._decode(tokens).strip(),
                          round(math.exp(min(out.logprobs, default=0.0)), 6), stop,
                          bool(tokens) and tokens[-1] == self.tokenizer.eos_token_id)
        return {**answer, "prompt_tokens": prompt_tokens,
                "completion_tokens": len(self.tokenizer(answer["text"],
                                                        add_special_tokens=False)["input_ids"]),
                "batch_size": self.active + 1,
                **({"embedding": pooled.embedding()} if pooled and pooled.complete else {})}

    async def stream(self, text: str | Chat, max_new_tokens: int, stop: Sequence[str],
                     piece_timeout_s: float, adapter: Adapter | None = None, embed: bool = False
                     ) -> AsyncIterator:
        """Pieces of `generate`'s answer as its tokens are generated; with `embed`, first the
        prompt's embedding as `generate` gives it (None where the prefill gave none), once the
        prefill has run. Leaving early (or a piece slower than `piece_timeout_s`,
        `TimeoutError`) takes the request out of the engine."""
        rid, outputs, _ = self._submit(text, max_new_tokens, True, adapter, embed)
        trim, decoded, done = StopTrimmer(stop), "", False
        try:
            while not (done or trim.stopped):
                try:
                    out = _checked(await asyncio.wait_for(outputs.get(), piece_timeout_s))
                except TimeoutError:
                    raise TimeoutError(f"no generated piece within {piece_timeout_s} s") from None
                if embed:  # the first token came out of the prefill's last step
                    pooled, embed = self.pooled.pop(rid, None), False
                    yield pooled.embedding() if pooled and pooled.complete else None
                done = out.is_finished()
                text_now = self._decode(out.generated_tokens)
                if text_now.endswith("\ufffd") and not done:
                    continue  # a character split across tokens: wait for the rest of it
                piece, decoded = text_now[len(decoded):], text_now
                if piece := trim.feed(piece):
                    yield piece
            if rest := trim.end():
                yield rest
        finally:
            self.pooled.pop(rid, None)
            self._leave(rid, done)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _leave(self, rid: str, done: bool) -> None:
        self.active -= 1
        self.adapters.pop(rid, None)
        if not done:  # its caller left (or failed): stop generating for nobody
            self.manager.cancel_request(rid)

    async def close(self) -> None:
        """Stop the step loop once the requests in it have ended (a swapped-out model)."""
        while self.active:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.manager.stop, block=True)
        for hook in self.hooks:
            hook.remove()


class _Pooled:
    """A prompt's last hidden states summed as its prefill runs."""

    def __init__(self, length: int):
        self.length, self.seen, self.total = length, 0, 0.0

    @property
    def complete(self) -> bool:
        return self.seen == self.length > 0

    def embedding(self) -> list[float]:
        from training.features import projected

        return projected((self.total / self.length).unsqueeze(0))[0].tolist()


def _checked(out):
    if out.error is not None:
        raise RuntimeError(f"generation failed: {out.error}")
    return out
