"""The shell every application shares, so each one only adds its routes and its work.

An application is a Serve ingress deployment subclassing `Pipeline`: it names itself (the
inference log's and the policy chain's name) and its settings model, and passes its FastAPI app
and its stages. Every application then has the same shape: `http_X` (the route) and `X` (the
handle method) both go through the policy chain to `_X`, which does the work; `GET /healthz`
comes with `create_app`. An application that answers each text of a request with one
classifier decision (moderation, support) subclasses `TextsPipeline`, which holds that work's
shell: it adds how one text is decided and how the answer is shaped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import ClassVar

from fastapi import FastAPI, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from monitoring.batching import unwrap
from serve_apps import metrics
from serve_apps.auth import Principal
from serve_apps.batch import Item, set_batching
from serve_apps.call import Answer, Call, Caller, Decided
from serve_apps.config import BreakerConfig, LimitsConfig
from serve_apps.http import TextsRequest, request_texts, served_by
from serve_apps.inference_log import InferenceLog
from serve_apps.policies import chain
from serve_apps.pressure import Pressure
from serve_apps.stages import Stages


class Pipeline:
    """Stages by deployment name (a handle, or None for a model served inline), the validated
    settings and limits, the inference log, and the policy chain with its edge guard on `app`."""

    application: ClassVar[str]
    settings: ClassVar[type[BaseModel]]

    def __init__(self, app: FastAPI, stages: dict[str, DeploymentHandle | None], config: dict,
                 limits: dict | None, tracking_uri: str | None, log: dict | None,
                 governance: dict | None):
        self.stages = Stages(stages, tracking_uri)
        self.tracking_uri = tracking_uri
        self.config = self.settings.model_validate(config or {})
        self.limits = LimitsConfig.model_validate(limits or {})
        self.log = InferenceLog(self.application, log)
        self.pressure = Pressure(None)  # the peak switch (`peak_switch`): set by `reconfigure`
        self.policies = chain(self.application, self.config.policies, self.config.guardrails,
                              governance)
        app.state.edge = self.policies.edge(self.limits)

    def batch_classifier(self, method: Callable) -> None:
        """For an application with a classifier: `method`'s batches sized by its settings."""
        set_batching(method, **self.config.classifier.batching.model_dump())

    def skip_generation(self, peak: bool) -> bool:
        """Whether a request at a peak goes without the generator (`PeakFallbackConfig`), which
        then counts it as a degraded answer."""
        fallback = self.pressure.config
        skip = peak and fallback is not None and fallback.generation == "skip"
        if skip:
            metrics.degraded("peak")
        return skip

    async def admit(self, action: str, request, correlation_id: str | None,
                    principal: Principal | dict | None, work: Callable[[Caller], Awaitable]):
        """A handle caller's request, through the same policies as an HTTP one."""
        caller = Caller(correlation_id, principal)
        return await self.policies.admit(action, request, caller, lambda: work(caller))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _classify(self, items: list[Item]) -> list[dict | Exception]:
        """Texts of concurrent requests go to the classifier in one call, not one call each
        (an item that failed gets its own exception). Serve batches per decorated function in a
        process, and each application's replica is a process of its own."""
        return await self.stages["Classifier"].predict_many.remote(items)

    async def reconfigure(self, user_config: dict) -> None:
        """The inline stages' models and the settings that change in place
        (`serve_apps.apps.pipeline_config`): the peak fallback's thresholds, the generator's
        breaker (each keeps its state)."""
        if "pressure" in user_config:
            self.pressure.configure(user_config["pressure"])
        if "breaker" in user_config:
            self.breaker.config = BreakerConfig.model_validate(user_config["breaker"])
        await self.stages.reconfigure(user_config)

    async def __del__(self) -> None:
        """Serve calls this on a graceful shutdown: nothing buffered is lost."""
        await self.log.close()


class TextsPipeline(Pipeline):
    """An application answering each text of a `TextsRequest` with one classifier decision: the
    texts go through the policy chain together, each is decided at once (their classifier calls
    batched across requests), the decisions are logged for the drift checks, and the answer is
    shaped once the output policies have seen its texts. A subclass defines both ends:
    `decide(item) -> Decided` (or the exception that failed that text) and
    `respond(call, answer)` (its response model)."""

    method: ClassVar[str]  # the handle method's name (callers and audit records use it)
    scope: ClassVar[str]  # the scope its callers' tokens need

    async def answer(self, request: TextsRequest | dict, correlation_id: str | None = None,
                     principal: Principal | dict | None = None) -> BaseModel:
        """Every text of the request answered; the same for HTTP and handle callers."""
        return await self.admit(self.method, request, correlation_id, principal,
                                lambda caller: self.answer_as(request, caller))

    async def answer_as(self, request: TextsRequest | dict, caller: Caller,
                        response: Response | None = None) -> BaseModel:
        """The answer to `caller` (an HTTP route's, with its `response` for the headers), its
        tokens reserved for the generator's longest answer."""
        call, answer = await self.policies.apply(
            self.scope, request_texts(request, self.limits), caller, self._work,
            self.config.generator.generation_config.max_new_tokens, response)
        return self.respond(call, answer)

    async def _work(self, call: Call) -> Answer:
        rid, tenant = call.request_id, call.principal.tenant
        with self.pressure.track() as peak:
            async with self.log.on_failure(rid, call.texts, call.started, tenant):
                done: list[Decided] = [unwrap(d) for d in await asyncio.gather(
                    *(self.decide(Item(t, rid, fallback=peak)) for t in call.texts))]
        decisions, models = [d.decision for d in done], [d.result.models for d in done]
        await self.log.record(rid, call.texts, decisions, models, call.started, tenant=tenant)
        fallback = served_by(decisions)
        return Answer([d.output for d in done], models,
                      sum(d.decision["tokens"] + d.tokens for d in done),
                      any(d.degraded for d in done) or fallback is not None,
                      [d.result for d in done], served_by=fallback)
