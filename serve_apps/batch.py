"""What a model deployment's batch holds (`Item`) and how its size is set (`set_batching`): the
pipelines need both without loading a model, so neither lives beside the models (torch)."""

from __future__ import annotations

from dataclasses import dataclass

from serve_apps.adapters import Adapter
from training.prompts import Chat


@dataclass(frozen=True)
class Item:
    """One text in a batch, with what routes it (request id; `fallback`: the pipeline is at a
    peak, `serve_apps/pressure.py`), how to run it (params) and, for a generator, the LoRA
    adapter that answers it (None: the base)."""

    text: str | Chat  # a conversation for a generator's chat completions
    request_id: str
    params: tuple = ()
    adapter: Adapter | None = None
    fallback: bool = False
    variant: str | None = None  # an adapter's canary side (None: the replica's variants route)
    embed: bool = False  # a generator's: its prompt's embedding wanted too (the log keeps it)


def set_batching(method, max_batch_size: int, batch_wait_timeout_s: float) -> None:
    """Resize a `@serve.batch` method's batches in place (from config, at any time)."""
    method.set_max_batch_size(max_batch_size)
    method.set_batch_wait_timeout_s(batch_wait_timeout_s)
