"""What one model replica serves (`ModelSlot`): the champion, a canary's challenger, the peak
fallback and a generator's adapters, loaded off the request path and switched in one assignment;
and how a batch's items are routed among them (`Variants`)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from serve_apps import metrics
from serve_apps.adapters import Adapter, pin_adapters
from serve_apps.batch import Item
from serve_apps.engine import ContinuousEngine
from serve_apps.model import LoadedModel, load
from serve_apps.model_config import CanaryConfig, GenerationConfig
from training.refs import ModelIdentity, resolve

# the variants a request is routed to (not the registry aliases of the same names)
CHAMPION_VARIANT, CHALLENGER_VARIANT, FALLBACK_VARIANT = "champion", "challenger", "fallback"


def answered_by(model: LoadedModel, adapter: Adapter | None, variant: str) -> dict:
    """An answer's `model`: the adapter's identity when one answered, else the model's."""
    return {**(adapter.identity if adapter is not None else model.identity).to_dict(),
            "variant": variant}


def bucket(request_id: str) -> float:
    """A stable number in [0, 1) per request id: the same id always lands on the same side."""
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class Variants:
    """What a replica serves at one moment; replaced as a whole, never edited."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    canary: CanaryConfig | None = None
    fallback: LoadedModel | None = None

    def route(self, item: Item) -> tuple[str, bool]:
        """(variant that answers, whether the challenger also shadows the request). At a peak
        the fallback answers everything but an adapter's requests (a student distils one model,
        not the adapters over it); an adapter runs on the base it was trained on."""
        if item.adapter is not None:
            return CHAMPION_VARIANT, False
        if item.fallback and self.fallback is not None:
            return FALLBACK_VARIANT, False
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
    # an adapter's canary, by adapter name: the challenger version and its split
    adapter_canaries: dict[str, tuple[ModelIdentity, CanaryConfig]] = field(default_factory=dict)
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
            canaries = {name: CanaryConfig(**c) for name, c in
                        (user_config.get("adapter_canaries") or {}).items()}
            challengers = await asyncio.to_thread(
                pin_adapters, {name: c.model for name, c in canaries.items()},
                champion.identity.uri, self.tracking_uri)
            had_adapters = self.serves_adapters
            self.variants = Variants(champion, challenger, canary, fallback)
            self.adapters = adapters
            self.adapter_canaries = {name: (challengers[name], c) for name, c in canaries.items()}
            self.adapter = user_config.get("adapter")
            self._retire_engines(generation != self.generation
                                 or had_adapters != self.serves_adapters)
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
                ContinuousEngine, model, self.generation, not self.serves_adapters))
        return await asyncio.shield(started)

    @property
    def serves_adapters(self) -> bool:
        return bool(self.adapters or self.adapter_canaries)

    def _retire_engines(self, changed: bool) -> None:
        """Close the engines of models no longer served (or all, when their settings `changed`:
        the generation's, or adapters came or went, `ContinuousEngine`'s `share_prefixes`),
        each once its requests have ended."""
        held = {id(m.model) for m in self.variants.held()}
        for key in [k for k in self.engines if k not in held or changed]:
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
                "adapter": self.adapter,
                "adapter_canaries": {name: c.model_dump() for name, (_, c) in
                                     self.adapter_canaries.items()}}

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
                out = {**out, "model": answered_by(model, items[i].adapter,
                                                   items[i].variant or variant)}
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
