"""The model deployments: sentence encoder, classifier and generator, all built on `ModelSlot`.

Hot swap: a changed `user_config` (model version, canary) reaches every replica through Serve's
`reconfigure()`. The new weights load in a worker thread while the replica keeps answering with
the old ones; then one assignment switches. Each batch reads the slot once, so a request is
answered wholly by one version, and requests already in a batch finish on the model they started
on. Reconfiguring in place (rather than a rolling replacement of replicas) keeps warm replicas and
their batch queues, and needs no spare capacity for a second set of replicas.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from ray import serve

from monitoring.batching import unwrap
from serve_apps.adapters import Adapter, check_base
from serve_apps.adapters import fetch as fetch_adapter
from serve_apps.batch import Item, set_batching
from serve_apps.http import InvalidRequest
from serve_apps.model import LoadedModel, device
from serve_apps.model_config import ModelDeploymentConfig
from serve_apps.slot import CHALLENGER_VARIANT, CHAMPION_VARIANT, ModelSlot, answered_by, bucket
from training.prompts import Chat
from training.refs import UnknownModel, resolve

MAX_ADAPTERS = ModelDeploymentConfig.model_fields["max_adapters"].default
EMBED_BATCH, EMBED_WAIT_S = 16, 0.01  # a generator's prompt embeddings (`Generator._embed`)


class _ModelDeployment:
    """What every model deployment shares: the slot, `reconfigure()`, batched `predict()` and
    `identity()`; each deployment adds only `run_batch`, its forward pass on a list of texts."""

    def __init__(self, tracking_uri: str | None = None):
        self.slot = ModelSlot(tracking_uri)

    async def reconfigure(self, user_config: dict) -> None:
        if user_config.get("threads"):
            import torch

            torch.set_num_threads(user_config["threads"])
        await self.slot.configure(user_config)
        batching = user_config.get("batching") or {}
        if batching:
            set_batching(self._batched, **batching)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # reconfigure() sets both
    async def _batched(self, items: list[Item]) -> list[dict | Exception]:
        return await self.slot.run(items, self.run_batch)

    async def predict(self, item: Item) -> dict:
        """One item per call; concurrent calls are answered as one batch."""
        return unwrap(await self._batched(item))

    async def predict_many(self, items: list[Item]) -> list[dict | Exception]:
        """A batch a pipeline already formed, run as one batch (no second wait); an item that
        failed has its exception in its place."""
        return await self.slot.run(items, self.run_batch)

    def identity(self) -> dict:
        """The versions this replica serves now, and where it runs."""
        import ray
        import torch

        return {**self.slot.identities(), "device": str(device()),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "threads": torch.get_num_threads()}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Classifier(_ModelDeployment):
    """Any registered classifier (support-router, moderation): label, confidence, scores, and
    the conformal prediction set at the configured `error_rate`; the posteriors adjusted to the
    class priors the controller re-estimated for a version after a label shift (`priors`:
    `{"version": ..., "weights": {label: new / training prior}}`, a hot change)."""

    error_rate: float | None = None
    priors: dict | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.error_rate, self.priors = user_config.get("error_rate"), user_config.get("priors")
        await super().reconfigure(user_config)

    def run_batch(self, model: LoadedModel, items: list[Item], _params: tuple) -> list[dict]:
        priors = self.priors if self.priors and \
            str(self.priors["version"]) == model.identity.version else None
        return [{**r, "batch_size": len(items)} for r in model.classify(
            [it.text for it in items], self.error_rate, priors and priors["weights"])]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Encoder(_ModelDeployment):
    """The bundled sentence encoder: L2-normalised embeddings (numpy float32)."""

    @staticmethod
    def run_batch(model: LoadedModel, items: list[Item], _params: tuple) -> list[dict]:
        return [{"embedding": e} for e in model.embed([it.text for it in items])]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class Generator(_ModelDeployment):
    """Any registered causal LM, and the LoRA adapters served over it (`serve_apps/adapters.py`),
    picked per request by name. Greedy requests share the continuous batch (or one `generate`
    per batch, where it is off), whatever their adapters; a sampled request (temperature above
    0) runs alone so its seed alone decides its output."""

    def __init__(self, tracking_uri: str | None = None):
        super().__init__(tracking_uri)
        self._fetch: Callable | None = None
        self._max_adapters: int | None = None

    async def reconfigure(self, user_config: dict) -> None:
        await super().reconfigure(user_config)
        size = user_config.get("max_adapters") or MAX_ADAPTERS
        if size != self._max_adapters:  # Serve's LRU size is fixed when it is made
            async def fetch(uri: str) -> Adapter:
                slot = self.slot
                identity = next((i for i in slot.adapters.values() if i.uri == uri), None) \
                    or await asyncio.to_thread(resolve, uri, slot.tracking_uri)
                return await asyncio.to_thread(fetch_adapter, identity,
                                               slot.variants.champion.identity.uri)

            self._fetch = serve.multiplexed(max_num_models_per_replica=size)(fetch)
            self._max_adapters = size

    async def adapter(self, model: str | None, request_id: str) -> tuple[Adapter | None, str | None]:
        """The adapter that answers request `request_id` naming `model` (None: the deployment's
        `adapter`; the base's name: none), fetched through Serve's multiplexing, and its canary
        side: where the adapter has a canary, the challenger version answers the requests its
        fraction of ids picks (sticky, as a model's canary)."""
        slot = self.slot
        name = slot.adapter if model is None else model
        if name is None or name == slot.variants.champion.identity.name:
            return None, None
        if name not in slot.adapters:
            served = [slot.variants.champion.identity.name, *slot.adapters]
            raise UnknownModel(f"model {name!r} is not served here; served: {served}")
        challenger, canary = slot.adapter_canaries.get(name, (None, None))
        if canary is not None and bucket(request_id) < canary.fraction:
            return await self._fetch(challenger.uri), CHALLENGER_VARIANT
        return await self._fetch(slot.adapters[name].uri), CHAMPION_VARIANT

    def params(self, max_new_tokens: int | None = None, temperature: float | None = None,
               seed: int | None = None, stop: list[str] | None = None, salt: str = "") -> tuple:
        g = self.slot.generation
        if seed is not None and not 0 <= seed < 2**32:
            raise InvalidRequest(f"seed must be a 32-bit unsigned integer, got {seed}")
        if temperature is not None and not 0 <= temperature <= 2:
            raise InvalidRequest(f"temperature must be within [0, 2], got {temperature}")
        p = {"max_new_tokens": min(max_new_tokens or g.max_new_tokens, g.max_new_tokens),
             "temperature": g.temperature if temperature is None else temperature,
             "seed": g.seed if seed is None else seed,
             "stop": tuple(g.stop if stop is None else stop)}
        key = (("salt", salt),) if p["temperature"] > 0 else ()
        return tuple(sorted(p.items())) + key

    async def generate(self, text: str | Chat, request_id: str, model: str | None = None,
                       embed: bool = False, fallback: bool = False, **options) -> dict:
        """The answer to one text (or a conversation, `training.prompts.Chat`) by `model` (the
        base's or an adapter's name; None: this
        deployment's `adapter`); with `embed`, also the prompt's embedding (for drift checks:
        `training.features.prompt_embeddings`); with `fallback` (a pipeline at a peak), by the
        generator's distilled student where it has one (`fallback`)."""
        adapter, variant = await self.adapter(model, request_id)
        item = Item(text, request_id, self.params(salt=request_id, **options), adapter,
                    variant=variant, embed=embed, fallback=fallback)
        if self.continuous(item.params):
            return unwrap((await self.slot.run([item], self._continuous_batch))[0])
        return await self.predict(item)

    async def generate_many(self, items: list[Item]) -> list[dict]:
        """A batch a pipeline already formed (items at a peak by the student, and with their
        prompts' embeddings, as `generate`'s `fallback` and `embed`), with this deployment's
        generation settings and adapter."""
        picked = [await self.adapter(None, it.request_id) for it in items]
        items = [Item(it.text, it.request_id, self.params(salt=it.request_id), adapter,
                      variant=variant, fallback=it.fallback, embed=it.embed)
                 for it, (adapter, variant) in zip(items, picked)]
        if items and self.continuous(items[0].params):
            return await self.slot.run(items, self._continuous_batch)
        return await self.predict_many(items)

    def continuous(self, params: tuple) -> bool:
        """Whether a request with `params` joins the continuous batch (`serve_apps/engine.py`):
        greedy ones, unless it is turned off."""
        return self.slot.generation.continuous_batching and dict(params)["temperature"] == 0

    async def _continuous_batch(self, model: LoadedModel, items: list[Item], params: tuple
                                ) -> list[dict | Exception]:
        _check_bases(model, items)
        engine, p = await self.slot.engine(model), dict(params)
        outs = await asyncio.gather(*(engine.generate(it.text, p["max_new_tokens"], p["stop"],
                                                      it.adapter, it.embed) for it in items),
                                    return_exceptions=True)
        # the prefill pooled most prompts' embeddings; the rest (cut, or a shared prefix) here
        missed = [i for i in _asked(items, outs) if "embedding" not in outs[i]]
        return _embedded(outs, missed, await asyncio.gather(
            *(self._embed(model, items[i].text, items[i].adapter) for i in missed)))

    @serve.batch(max_batch_size=EMBED_BATCH, batch_wait_timeout_s=EMBED_WAIT_S)
    async def _embed(self, models: list[LoadedModel], texts: list[str],
                     adapters: list[Adapter | None]) -> list[list[float]]:
        """The prompt embeddings of concurrent requests that no continuous batch's prefill gave
        (sampled answers, cut prompts), one forward pass per model: it holds the model's lock,
        which the continuous batch's steps wait for."""
        vectors: list = [None] * len(texts)
        for model in {id(m): m for m in models}.values():
            at = [i for i, m in enumerate(models) if m is model]
            for i, v in zip(at, await asyncio.to_thread(
                    model.embed_prompts, [texts[i] for i in at], [adapters[i] for i in at])):
                vectors[i] = v
        return vectors

    @staticmethod
    def run_batch(model: LoadedModel, items: list[Item], params: tuple) -> list[dict]:
        _check_bases(model, items)
        outs = model.generate([it.text for it in items], **{k: v for k, v in params if k != "salt"},
                              adapters=[it.adapter for it in items])
        outs = [{**out, "batch_size": len(items)} for out in outs]
        asked = _asked(items, outs)
        return _embedded(outs, asked, model.embed_prompts([items[i].text for i in asked],
                                                          [items[i].adapter for i in asked])
                         if asked else [])

    async def stream(self, text: str | Chat, request_id: str, model: str | None = None,
                     embed: bool = False, fallback: bool = False, **options
                     ) -> AsyncIterator[dict]:
        """Pieces of the answer as they are generated; the first carries the model identity
        (and with `embed`, the prompt's embedding); `fallback` as `generate`'s."""
        params = self.params(**options)
        p = dict(kv for kv in params if kv[0] != "salt")
        adapter, side = await self.adapter(model, request_id)
        variant, _ = self.slot.variants.route(Item(text, request_id, adapter=adapter,
                                                   fallback=fallback))
        loaded = self.slot.variants.model(variant)
        head = {"model": answered_by(loaded, adapter, side or variant),
                "prompt_tokens": loaded.prompt_tokens(text), "embedding": None}
        if self.continuous(params):  # the head once the prefill has given the embedding
            engine = await self.slot.engine(loaded)
            pieces = engine.stream(text, p["max_new_tokens"], p["stop"],
                                   self.slot.generation.piece_timeout_s, adapter, embed)
            try:
                if embed:
                    head["embedding"] = await anext(pieces, None) \
                        or await self._embed(loaded, text, adapter)
                yield head
                async for piece in pieces:
                    yield {"text": piece}
            finally:  # a caller gone takes its request out of the engine now, not when collected
                await pieces.aclose()
            return
        if embed:
            head["embedding"] = await self._embed(loaded, text, adapter)
        cancel = threading.Event()  # set when the caller leaves: the generation stops
        try:
            pieces = await asyncio.to_thread(loaded.stream, text, **p, cancel=cancel,
                                             piece_timeout_s=self.slot.generation.piece_timeout_s,
                                             adapter=adapter)
            yield head
            while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                yield {"text": piece}
        finally:
            cancel.set()


def _check_bases(model: LoadedModel, items: list[Item]) -> None:
    """Refuse the batch if the base moved under a request holding an adapter of the old one."""
    for it in items:
        if it.adapter is not None:
            check_base(it.adapter.identity, model.identity.uri)


def _asked(items: list[Item], outs: list) -> list[int]:
    """Where the items that asked for their prompt's embedding (`Item.embed`) were answered."""
    return [i for i, it in enumerate(items) if it.embed and not isinstance(outs[i], Exception)]


def _embedded(outs: list, asked: list[int], vectors: list) -> list:
    """`outs` (answers, or exceptions in their place) with the embeddings of `asked`."""
    at = dict(zip(asked, vectors))
    return [{**out, "embedding": at[i]} if i in at else out for i, out in enumerate(outs)]
