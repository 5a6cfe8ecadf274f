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
import hashlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from ray import serve

from monitoring.batching import unwrap
from serve_apps import metrics
from serve_apps.adapters import Adapter, check_base, pin_adapters
from serve_apps.adapters import fetch as fetch_adapter
from serve_apps.config import CanaryConfig, GenerationConfig, ModelDeploymentConfig
from serve_apps.engine import ContinuousEngine
from serve_apps.http import InvalidRequest
from serve_apps.model import LoadedModel, device, load
from training.refs import ModelIdentity, UnknownModel, resolve

# the variants a request is routed to (not the registry aliases of the same names)
CHAMPION_VARIANT, CHALLENGER_VARIANT, FALLBACK_VARIANT = "champion", "challenger", "fallback"
MAX_ADAPTERS = ModelDeploymentConfig.model_fields["max_adapters"].default


def _answered_by(model: LoadedModel, adapter: Adapter | None, variant: str) -> dict:
    """An answer's `model`: the adapter's identity when one answered, else the model's."""
    return {**(adapter.identity if adapter is not None else model.identity).to_dict(),
            "variant": variant}


def set_batching(method, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Resize a `@serve.batch` method's batches in place (from config, at any time)."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_timeout_s)


def bucket(request_id: str) -> float:
    """A stable number in [0, 1) per request id: the same id always lands on the same side."""
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class Item:
    """One text in a batch, with what routes it (request id; `fallback`: the pipeline is at a
    peak, `serve_apps/pressure.py`), how to run it (params) and, for a generator, the LoRA
    adapter that answers it (None: the base)."""

    text: str
    request_id: str
    params: tuple = ()
    adapter: Adapter | None = None
    fallback: bool = False


@dataclass(frozen=True)
class Variants:
    """What a replica serves at one moment; replaced as a whole, never edited."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    canary: CanaryConfig | None = None
    fallback: LoadedModel | None = None

    def route(self, item: Item) -> tuple[str, bool]:
        """(variant that answers, whether the challenger also shadows the request). At a peak
        the fallback answers everything; an adapter runs on the base it was trained on."""
        if item.fallback and self.fallback is not None:
            return FALLBACK_VARIANT, False
        if item.adapter is not None:
            return CHAMPION_VARIANT, False
        return self.split(item.request_id)

    def split(self, request_id: str) -> tuple[str, bool]:
        """The canary's split of request ids."""
        if self.challenger is None or self.canary is None:
            return CHAMPION_VARIANT, False
        chosen = bucket(request_id) < self.canary.fraction
        if self.canary.shadow:
            return CHAMPION_VARIANT, chosen
        return (CHALLENGER_VARIANT if chosen else CHAMPION_VARIANT), False

    def model(self, variant: str) -> LoadedModel:
        """The model of a route's variant (`shadow`: the challenger's copy of the request)."""
        return {CHAMPION_VARIANT: self.champion, CHALLENGER_VARIANT: self.challenger,
                "shadow": self.challenger, FALLBACK_VARIANT: self.fallback}[variant]

    def held(self) -> list[LoadedModel]:
        return [m for m in (self.champion, self.challenger, self.fallback) if m is not None]


@dataclass
class ModelSlot:
    """The model(s) a replica serves, loaded off the request path and switched atomically."""

    tracking_uri: str | None
    variants: Variants | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    adapters: dict[str, ModelIdentity] = field(default_factory=dict)
    adapter: str | None = None  # the adapter of requests that name none
    engines: dict[int, asyncio.Future] = field(default_factory=dict)  # by id of the module
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _reporter: asyncio.Task | None = None

    async def configure(self, user_config: dict) -> None:
        async with self._lock:
            canary = CanaryConfig(**user_config["canary"]) if user_config.get("canary") else None
            current = self.variants
            precision = user_config.get("precision", "fp32")
            champion = await self._get(user_config["model"], user_config.get("alias"), precision,
                                       current)
            challenger = (await self._get(canary.model, canary.alias, precision, current)
                          if canary else None)
            peak = user_config.get("fallback")
            fallback = (await self._get(peak["model"], peak.get("alias"), precision, current)
                        if peak else None)
            generation = GenerationConfig(**(user_config.get("generation") or {}))
            adapters = await asyncio.to_thread(pin_adapters, user_config.get("adapters") or {},
                                               champion.identity.uri, self.tracking_uri)
            self.variants = Variants(champion, challenger, canary, fallback)
            self.adapters = adapters
            self.adapter = user_config.get("adapter")
            self._retire_engines(generation)
            self.generation = generation
            if self._reporter is None:
                self._reporter = asyncio.get_running_loop().create_task(self._report_versions())

    async def engine(self, model: LoadedModel) -> ContinuousEngine:
        """The continuous batch of `model`, started by its first request (shielded: a caller
        that gives up, a timeout, must not cancel it for the others)."""
        key = id(model.model)
        started = self.engines.get(key)
        if started is None or started.done() and (started.cancelled() or started.exception()):
            started = self.engines[key] = asyncio.ensure_future(asyncio.to_thread(
                ContinuousEngine, model.model, model.tokenizer, self.generation))
        return await asyncio.shield(started)

    def _retire_engines(self, generation: GenerationConfig) -> None:
        """Close the engines of models no longer served (or all, when their settings changed),
        each once its requests have ended."""
        held = {id(m.model) for m in self.variants.held()}
        for key in [k for k in self.engines if k not in held or generation != self.generation]:
            self.engines.pop(key).add_done_callback(_close_engine)

    async def _report_versions(self, every_s: float = 5.0) -> None:
        """Keep the `llmops_model_info` gauge of this replica's versions fresh."""
        while True:
            metrics.model_info(self.identities())
            await asyncio.sleep(every_s)

    async def _get(self, ref: str, alias: str | None, precision: str,
                   current: Variants | None) -> LoadedModel:
        """The loaded model for `ref`: reused when this replica already holds that version."""
        identity: ModelIdentity = await asyncio.to_thread(resolve, ref, self.tracking_uri)
        identity = replace(identity, alias=alias or identity.alias)
        for held in current.held() if current else ():
            if (held.identity.name, held.identity.version, held.precision) == \
                    (identity.name, identity.version, precision):
                return replace(held, identity=identity)
        loaded = await asyncio.to_thread(load, ref, self.tracking_uri, precision)
        return replace(loaded, identity=identity, precision=precision)

    def identities(self) -> dict:
        v = self.variants
        return {"champion": v.champion.identity.to_dict(),
                "challenger": v.challenger.identity.to_dict() if v.challenger else None,
                "canary": v.canary.model_dump() if v.canary else None,
                "fallback": v.fallback.identity.to_dict() if v.fallback else None,
                "adapters": {name: i.to_dict() for name, i in self.adapters.items()},
                "adapter": self.adapter}

    async def run(self, items: list[Item], fn: Callable[[LoadedModel, list[Item], tuple], list[dict]]
                  ) -> list[dict | Exception]:
        """Answer a batch: group items by variant and params, one forward pass per group (its
        items' adapters mixed in it). An item that fails has its exception in its place
        (`unwrap` raises it for its caller)."""
        v = self.variants
        routes = [v.route(it) for it in items]
        jobs: dict[tuple, list[int]] = {}
        for i, (it, (variant, shadow)) in enumerate(zip(items, routes)):
            jobs.setdefault((variant, it.params), []).append(i)
            if shadow:
                jobs.setdefault(("shadow", it.params), []).append(i)
        results: list = [{} for _ in items]
        for (variant, params), idx in jobs.items():
            model = v.model(variant)
            started = time.perf_counter()
            outs = await self._isolated(fn, model, [items[i] for i in idx], params)
            metrics.batch(model.identity.name, model.identity.version, len(idx),
                          time.perf_counter() - started)
            for i, out in zip(idx, outs):
                if isinstance(out, Exception) or isinstance(results[i], Exception):
                    if variant != "shadow":  # a failed shadow never fails the answer
                        results[i] = out
                    continue
                out = {**out, "model": _answered_by(model, items[i].adapter, variant)}
                if variant == "shadow":
                    results[i]["shadow"] = out
                else:
                    results[i].update(out)
        return results

    @staticmethod
    async def _isolated(fn: Callable, model: LoadedModel, items: list[Item], params: tuple
                        ) -> list[dict | Exception]:
        """`fn` on the whole group; if it fails, on each item alone, so one text that fails
        the model fails only its own request (its exception in its place). An async `fn`
        answers each item on its own already."""
        if inspect.iscoroutinefunction(fn):
            return await fn(model, items, params)
        try:
            return await asyncio.to_thread(fn, model, items, params)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        outs: list[dict | Exception] = []
        for item in items:
            try:
                outs += await asyncio.to_thread(fn, model, [item], params)
            except Exception as exc:
                outs.append(exc)
        return outs


def _close_engine(started: asyncio.Future) -> None:
    if not started.cancelled() and started.exception() is None:
        asyncio.ensure_future(started.result().close())


class _ModelDeployment:
    """What every model deployment shares: the slot, `reconfigure()`, batched `predict()` and
    `identity()`; each deployment adds only `run_batch`, its forward pass on a list of texts."""

    def __init__(self, tracking_uri: str | None = None):
        self.slot = ModelSlot(tracking_uri)

    async def reconfigure(self, user_config: dict) -> None:
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

        return {**self.slot.identities(), "device": str(device()),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


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
    picked per request by name. Greedy requests batch together, whatever their adapters; a
    sampled request (temperature above 0) runs alone so its seed alone decides its output."""

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

    async def adapter(self, model: str | None) -> Adapter | None:
        """The adapter that answers a request naming `model` (None: the deployment's `adapter`;
        the base's name: none), fetched through Serve's multiplexing."""
        slot = self.slot
        name = slot.adapter if model is None else model
        if name is None or name == slot.variants.champion.identity.name:
            return None
        if name not in slot.adapters:
            served = [slot.variants.champion.identity.name, *slot.adapters]
            raise UnknownModel(f"model {name!r} is not served here; served: {served}")
        return await self._fetch(slot.adapters[name].uri)

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

    async def generate(self, text: str, request_id: str, model: str | None = None,
                       **options) -> dict:
        """The answer to one text by `model` (the base's or an adapter's name; None: this
        deployment's `adapter`)."""
        adapter = await self.adapter(model)
        item = Item(text, request_id, self.params(salt=request_id, **options), adapter)
        if self.continuous(item.params):
            return unwrap((await self.slot.run([item], self._continuous_batch))[0])
        return await self.predict(item)

    async def generate_many(self, items: list[Item]) -> list[dict]:
        """A batch a pipeline already formed, with this deployment's generation settings and
        adapter."""
        adapter = await self.adapter(None)
        items = [Item(it.text, it.request_id, self.params(salt=it.request_id), adapter)
                 for it in items]
        if items and self.continuous(items[0].params):
            return await self.slot.run(items, self._continuous_batch)
        return await self.predict_many(items)

    def continuous(self, params: tuple) -> bool:
        """Whether a request with `params` joins the continuous batch (`serve_apps/engine.py`):
        greedy ones of a generator serving no adapters, unless it is turned off."""
        return self.slot.generation.continuous_batching and not self.slot.adapters \
            and dict(params)["temperature"] == 0

    async def _continuous_batch(self, model: LoadedModel, items: list[Item], params: tuple
                                ) -> list[dict | Exception]:
        engine, p = await self.slot.engine(model), dict(params)
        return await asyncio.gather(*(engine.generate(it.text, p["max_new_tokens"], p["stop"])
                                      for it in items), return_exceptions=True)

    @staticmethod
    def run_batch(model: LoadedModel, items: list[Item], params: tuple) -> list[dict]:
        for it in items:  # the base moved under a request that holds an adapter of the old one
            if it.adapter is not None:
                check_base(it.adapter.identity, model.identity.uri)
        outs = model.generate([it.text for it in items], **{k: v for k, v in params if k != "salt"},
                              adapters=[it.adapter for it in items])
        return [{**out, "batch_size": len(items)} for out in outs]

    async def stream(self, text: str, request_id: str, model: str | None = None,
                     **options) -> AsyncIterator[dict]:
        """Pieces of the answer as they are generated; the first carries the model identity."""
        params = self.params(**options)
        p = dict(kv for kv in params if kv[0] != "salt")
        adapter = await self.adapter(model)
        variant = self.slot.variants.split(request_id)[0] if adapter is None else CHAMPION_VARIANT
        loaded = self.slot.variants.model(variant)
        head = {"model": _answered_by(loaded, adapter, variant),
                "prompt_tokens": loaded.prompt_tokens(text)}
        if self.continuous(params):
            engine = await self.slot.engine(loaded)
            yield head
            async for piece in engine.stream(text, p["max_new_tokens"], p["stop"],
                                             self.slot.generation.piece_timeout_s):
                yield {"text": piece}
            return
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
