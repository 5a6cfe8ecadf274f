"""LoRA adapters served over their base: many per generator replica, picked per request.

A generator deployment serves one base model and any number of adapters trained on it
(`adapters:` in its config: the name a request picks it by -> a registered adapter version). A
replica fetches an adapter on its first request for it through Serve's model multiplexing
(`@serve.multiplexed`, keyed by the pinned version): it keeps the `max_adapters` most recently
used ones, and Serve routes a request to a replica that already holds its adapter. Batches mix
adapters: PEFT applies each row's own adapter (`adapter_names`, `__base__` for the base), so
requests for different adapters share one forward pass; in a continuous batch, whose step packs
every request's tokens into one row, each token is a row of PEFT's mixed-adapter forward
(`AdapterHost.per_token`).

Swapping an adapter pins its new version in the generator's `user_config`: the next request
for it fetches that version under its own multiplexed id, requests already holding the old one
finish on it, and no replica restarts. The base an adapter was trained on must be the one
served: checked from the version's `llmops.base` tag when a config is built or swapped, and
again when a replica fetches it.

Light to import (the deploy client uses `pin_adapters`): torch and PEFT load where adapters run.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from training.errors import BaseMismatch, LLMOpsError
from training.refs import ModelIdentity, resolve

BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class Adapter:
    """One adapter version in a replica's memory: its LoRA config and weights."""

    identity: ModelIdentity
    config: object  # peft.LoraConfig
    weights: dict

    @property
    def key(self) -> str:
        """Its name inside the PEFT model (module keys: no dots)."""
        return f"{self.identity.name}-v{self.identity.version}".replace(".", "_")


def check_base(identity: ModelIdentity, served: str) -> None:
    """Refuse an adapter version that is not an adapter of the base `served`."""
    if identity.base is None:
        raise LLMOpsError(f"{identity.uri} is not a LoRA adapter (it names no base); serve it "
                          f"as a generator's model instead")
    if identity.base != served:
        raise BaseMismatch(f"adapter {identity.uri} was trained on {identity.base}, but this "
                           f"generator serves {served}: serve it over {identity.base}, or train "
                           f"the adapter on {served}")


def pin_adapters(adapters: Mapping[str, str | dict], base: str, tracking_uri: str | None
                 ) -> dict[str, ModelIdentity]:
    """The exact version of each adapter (a reference, or `{"model", "alias"}` as a
    `user_config` holds it) now, after checking it was trained on `base` (a pinned
    reference)."""
    out = {}
    for name, ref in adapters.items():
        ref, alias = (ref, None) if isinstance(ref, str) else (ref["model"], ref.get("alias"))
        identity = resolve(ref, tracking_uri)
        check_base(identity, base)
        out[name] = replace(identity, alias=identity.alias or alias)
    return out


def as_config(pinned: Mapping[str, ModelIdentity]) -> dict[str, dict]:
    """Pinned adapters as a `user_config` holds them."""
    return {name: {"model": i.uri, "alias": i.alias} for name, i in pinned.items()}


def fetch(identity: ModelIdentity, served: str) -> Adapter:
    """Download and read an adapter version (blocking: run it off the event loop)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from training.lora import ADAPTER_WEIGHTS
    from training.registry import download_hf_model

    check_base(identity, served)
    folder = download_hf_model(identity.uri)
    return Adapter(identity, LoraConfig.from_pretrained(folder), load_file(folder / ADAPTER_WEIGHTS))


class AdapterHost:
    """The adapters attached to one base model in memory. The first one wraps the base with
    PEFT in place; one that no request holds any more (Serve's LRU dropped it and its last
    request ended) is detached at the next batch; the last one detached unwraps the base.
    Every method runs under the model's lock: attached adapters are state of the modules."""

    def __init__(self) -> None:
        self.peft = None
        self.attached: dict[str, weakref.ref] = {}

    def prepare(self, model, adapters: Sequence[Adapter | None]) -> tuple[object, list | None]:
        """(the module to run, each row's adapter name for PEFT, or None: no adapter attached)."""
        wanted = {a.key: a for a in adapters if a is not None}
        for key, held in list(self.attached.items()):
            if key not in wanted and held() is None:
                self._detach(key)
        for key, adapter in wanted.items():
            if key not in self.attached:
                self._attach(model, adapter)
            self.attached[key] = weakref.ref(adapter)
        if self.peft is None:
            return model, None
        return self.peft, [a.key if a is not None else BASE_ROW for a in adapters]

    def per_token(self, names: Sequence[str], padding: int = 0) -> list:
        """Run the attached LoRA layers with `names[i]` as token i's adapter (and the base for
        `padding` tokens after them), until the returned hook handles are removed. A continuous
        batch's step is one row of every request's tokens (shape 1 x tokens); PEFT mixes
        adapters across the rows of a batch, so each layer sees its input with the tokens as
        rows (tokens x 1) and gives its output back as one row. A step whose tokens all take
        one adapter (one adapter's traffic) runs PEFT's plain forward with it active instead:
        the same sums, without gathering and scattering each adapter's rows in every layer."""
        from peft.tuners.lora import LoraLayer

        if names and names[0] != BASE_ROW and all(n == names[0] for n in names):
            if self.peft.active_adapter != names[0]:
                self.peft.set_adapter(names[0], inference_mode=True)
            return []
        names = [*names, *[BASE_ROW] * padding]
        handles = []
        for layer in self.peft.modules():
            if isinstance(layer, LoraLayer):
                handles += [layer.register_forward_pre_hook(
                    functools.partial(_tokens_as_rows, names=names), with_kwargs=True),
                    layer.register_forward_hook(_rows_as_tokens)]
        return handles

    def _attach(self, model, adapter: Adapter) -> None:
        from peft import get_peft_model
        from peft.utils import set_peft_model_state_dict

        config = copy.copy(adapter.config)  # for inference: no dropout, nothing to train
        config.inference_mode, config.lora_dropout = True, 0.0
        if self.peft is None:
            self.peft = get_peft_model(model, config, adapter_name=adapter.key)
        else:
            self.peft.add_adapter(adapter.key, config)
        set_peft_model_state_dict(self.peft, adapter.weights, adapter_name=adapter.key)
        self.peft.eval()

    def _detach(self, key: str) -> None:
        del self.attached[key]
        if self.attached:
            self.peft.delete_adapter(key)
        else:  # PEFT cannot run with none: give the base its own layers back
            self.peft.unload()
            self.peft = None


def _tokens_as_rows(_layer, args, kwargs, names):
    return (args[0].transpose(0, 1), *args[1:]), {**kwargs, "adapter_names": names}


def _rows_as_tokens(_layer, _args, output):
    return output.transpose(0, 1)
