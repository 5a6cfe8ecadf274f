"""A pipeline's model stages, each either a replica of its own (a Serve deployment, reached by
its handle) or inline: the same deployment class living inside the pipeline replica, called
through the same interface without a hop.

Inline is the choice for CPU models that share the pipeline's node and do not generate text
(what `placement: auto` picks): no serialisation of the batch and its answers, no second
queue, one process fewer per model. Its hot swap is the same: the pipeline's `user_config`
holds each inline stage's own (`{"models": {"Classifier": {...}}}`), and the pipeline's
`reconfigure()` hands it on, so the new version loads beside the old one and one assignment
switches. A replica of its own stays the choice for GPU models, generators and models that
scale apart from their pipeline.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping

from ray.serve.handle import DeploymentHandle


def model_deployments() -> dict:
    """The model deployments by name, imported when a stage needs one: they load torch, which
    a pipeline whose models all have replicas of their own never needs."""
    from serve_apps.deployments import Classifier, Encoder, Generator

    return {d.name: d for d in (Classifier, Encoder, Generator)}


class _Stream:
    """An inline stream as a handle's streaming response is used: iterated, and `cancel()`ed
    when its caller leaves (the generation stops)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await anext(self.pieces)

    def cancel(self) -> None:
        asyncio.ensure_future(self.pieces.aclose())


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        """The method's answer as something to await (or to iterate, for a stream); as with a
        handle, the method runs, and raises, only when that happens."""
        if inspect.isasyncgenfunction(self.fn):
            return _Stream(self.fn(*args, **kwargs))
        if inspect.iscoroutinefunction(self.fn):
            return self.fn(*args, **kwargs)
        return _call(self.fn, args, kwargs)


async def _call(fn, args: tuple, kwargs: dict):
    return fn(*args, **kwargs)


class InProcess:
    """A model deployment's object inside the pipeline replica, called like its handle
    (`stage.predict_many.remote(items)`, `stage.options(stream=True).stream.remote(...)`)."""

    def __init__(self, deployment: str, tracking_uri: str | None):
        self.model = model_deployments()[deployment].func_or_class(tracking_uri)

    def options(self, **_) -> InProcess:
        return self

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.model, name))


class Stages:
    """The stages of one pipeline replica by deployment name: the handle Serve passed for a
    stage with a replica of its own, an `InProcess` model for an inline one (passed as None)."""

    def __init__(self, handles: Mapping[str, DeploymentHandle | None], tracking_uri: str | None):
        self.inline = {name: InProcess(name, tracking_uri)
                       for name, handle in handles.items() if handle is None}
        self.stages = {name: handle or self.inline[name] for name, handle in handles.items()}

    def __getitem__(self, name: str) -> DeploymentHandle | InProcess:
        return self.stages[name]

    async def reconfigure(self, user_config: dict) -> None:
        """Each inline stage's part of the pipeline's `user_config`, one after another:
        transformers' lazy imports are not safe from two loading threads at once."""
        models = user_config.get("models") or {}
        for name, stage in self.inline.items():
            await stage.model.reconfigure(models[name])
