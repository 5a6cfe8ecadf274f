"""LoRA adapters (PEFT) over a frozen causal language model.

A LoRA fine-tune trains only the low-rank matrices PEFT adds to the target layers; its
checkpoints and its registered version hold the adapter alone (PEFT's `adapter_config.json` and
`adapter_model.safetensors`), and its metadata names the exact base it was trained on:
`models:/NAME/VERSION` (the registry keeps versions immutable), or a folder or hub id with the
SHA-256 of the folder's files. Loading an adapter loads that base and refuses one whose files
changed since, so an adapter never runs on weights it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from training.config import LoraSpec
from training.errors import BaseMismatch, LLMOpsError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _peft_config(spec: LoraSpec):
    from peft import LoraConfig, TaskType

    targets = spec.target_modules
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets,
                      task_type=TaskType.CAUSAL_LM)


def layer_names(model: torch.nn.Module) -> list[str]:
    """The names LoRA can target: the last part of the path of each layer with weights."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and not list(module.children()) and
                   getattr(module, "weight", None) is not None})


def adapt(model: torch.nn.Module, spec: LoraSpec, base: str):
    """`model` with LoRA adapters on `spec.target_modules`, every other weight frozen."""
    from peft import get_peft_model

    known = layer_names(model)
    if missing := [t for t in spec.target_modules or [] if t != "all-linear" and t not in known]:
        raise LLMOpsError(f"lora.target_modules {missing} are not layers of this model; its "
                          f"layers are: {', '.join(known)}")
    try:
        adapted = get_peft_model(model, _peft_config(spec))
    except ValueError as exc:  # e.g. no default targets for an architecture PEFT does not know
        raise LLMOpsError(f"LoRA cannot adapt this model: {str(exc).splitlines()[0]} (set "
                          f"lora.target_modules; its layers are: {', '.join(known)})") from exc
    adapted.peft_config["default"].base_model_name_or_path = base  # not the folder it came from
    return adapted


def check(config_dir: Path, spec: LoraSpec, base: str) -> None:
    """Raise the error `adapt` would, on a weightless copy of the base (cheap for any size), so
    a wrong setting fails before any worker starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        adapt(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)), spec, base)


def save_adapter(model_config_dir: Path, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write the trained adapter weights (named as in the training module) as PEFT's adapter
    folder, beside the adapter config saved during training."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = LoraConfig.from_pretrained(model_config_dir)
    base, config.base_model_name_or_path = config.base_model_name_or_path, None
    with torch.device("meta"):  # only the names and the config matter here, not the weights
        skeleton = get_peft_model(AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_config_dir)), config)
    expected = {n for n, p in skeleton.named_parameters() if p.requires_grad}
    if set(state_dict) != expected:
        raise LLMOpsError(f"the checkpoint does not hold this adapter: missing "
                          f"{sorted(expected - set(state_dict))[:3]}, unexpected "
                          f"{sorted(set(state_dict) - expected)[:3]}")
    adapter = get_peft_model_state_dict(skeleton, state_dict=state_dict)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, out_dir / ADAPTER_WEIGHTS)
    config.base_model_name_or_path = base
    config.save_pretrained(out_dir)


def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and contents of a model folder's files (hidden ones aside)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and
                       not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def lineage(source: str, folder: Path) -> dict[str, str]:
    """What identifies the base exactly: its pinned registry version, or a folder's digest."""
    if source.startswith("models:/"):
        return {"base": source}
    return {"base": source, "base_sha256": folder_digest(folder)}


def load_adapted(folder: Path, meta: dict):
    """The adapter in `folder` on the base its metadata names, merged into one model for
    inference (the same answers as the adapter beside the base, at the base's speed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.models import resolve_source

    base_dir = resolve_source(meta["base"])
    if meta.get("base_sha256") and folder_digest(base_dir) != meta["base_sha256"]:
        raise BaseMismatch(f"the adapter in {folder} was trained on {meta['base']} with "
                           f"sha256 {meta['base_sha256'][:12]}..., but that base's files have "
                           f"changed since; restore them or train the adapter again")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()


def adapter_config(folder: Path) -> dict:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
