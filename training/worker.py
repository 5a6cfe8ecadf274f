"""What each Ray Train worker runs: the model (an adapter over its frozen base with LoRA) in a
DeepSpeed ZeRO engine, its epochs and per-epoch checkpoints; and the consolidation of the last
checkpoint to a model folder. Only workers and the consolidating driver import it (torch,
transformers, DeepSpeed): Ray Train's controller unpickles `training.finetune` alone.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from training import lora
from training.config import DeepSpeedConfig
from training.finetune import HF_DIR, TAG, FinetuneSpec
from training.models import (
    build_model,
    collate,
    encode_causal_lm,
    encode_classification,
    model_from_state_dict,
)


def deepspeed_config(ds: DeepSpeedConfig, batch_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config; bf16 only on GPUs that support it."""
    bf16 = ds.bf16 == "on" or (ds.bf16 == "auto" and on_gpu and torch.cuda.is_bf16_supported())
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.stage},
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def _encode(spec: FinetuneSpec, inputs: list[str], targets: list,
            soft: list[list[float]] | None = None) -> list[dict]:
    if spec.kind == "classification":
        rows = encode_classification(spec.tokenizer, inputs, targets, spec.model.max_length)
        return rows if soft is None else [{**r, "soft": s} for r, s in zip(rows, soft)]
    return encode_causal_lm(spec.tokenizer, inputs, targets, spec.model.max_length)


def _loss(engine, batch: dict, device, spec: FinetuneSpec):
    """The model's own loss; with soft targets in the batch, Hinton et al.'s distillation loss:
    `alpha` x T^2 x KL(teacher || student, both at temperature T) + (1 - alpha) x that loss."""
    soft = batch.pop("soft", None)
    out = engine(**{k: v.to(device) for k, v in batch.items()})
    if soft is None:
        return out.loss
    t = spec.distill_temperature
    kd = torch.nn.functional.kl_div(torch.log_softmax(out.logits.float() / t, dim=-1),
                                    soft.to(device), reduction="batchmean") * t * t
    return spec.distill_alpha * kd + (1 - spec.distill_alpha) * out.loss


def _loader(rows: list[dict], spec: FinetuneSpec, rank: int, world: int, shuffle: bool):
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=shuffle,
                                 seed=spec.seed, drop_last=False)
    pad = spec.tokenizer.pad_token_id
    return sampler, DataLoader(rows, batch_size=spec.batch_size, sampler=sampler,
                               collate_fn=lambda b: collate(b, pad))


def _val_loss(engine, loader, device, spec: FinetuneSpec) -> float:
    """Mean validation loss over every worker's shard (all-reduced)."""
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            n = len(batch["input_ids"])
            total += torch.tensor([_loss(engine, batch, device, spec).item() * n, n],
                                  dtype=torch.float64)
    dist.all_reduce(total)
    engine.train()
    return float(total[0] / max(total[1], 1))


def _linear_warmup_decay(warmup: int, total: int):
    """Learning-rate factor per step: linear warm-up, then linear decay to zero."""
    return lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup + 1)))


def _optimized(spec: FinetuneSpec, steps_per_epoch: int):
    """The model to train (an adapter over its frozen base with LoRA), a torch AdamW over what
    trains, and its schedule."""
    model = build_model(spec.model, spec.kind, spec.labels, spec.tokenizer)
    if spec.lora is not None:
        model = lora.adapt(model, spec.lora, spec.model.source)
    total = spec.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=spec.learning_rate, weight_decay=spec.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_warmup_decay(max(1, int(spec.warmup_ratio * total)), total))
    return model, optimizer, schedule


def fit_in_process(spec: FinetuneSpec):
    """`spec`'s model fine-tuned in this process, without Ray or DeepSpeed, as one worker
    would (same optimizer, schedule, clipping, shuffling and loss): where a trained model is
    needed in seconds, not a job (the tests' registered models, a benchmark's retrain)."""
    torch.manual_seed(spec.seed)
    sampler, loader = _loader(_encode(spec, spec.train_inputs, spec.train_targets,
                                      spec.soft_targets), spec, 0, 1, shuffle=True)
    model, optimizer, schedule = _optimized(spec, len(loader))
    model.train()
    for epoch in range(spec.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            _loss(model, batch, torch.device("cpu"), spec).backward()
            if spec.deepspeed.gradient_clipping:
                torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               spec.deepspeed.gradient_clipping)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return model.eval()


def _engine(spec: FinetuneSpec, steps_per_epoch: int, on_gpu: bool):
    """The model wrapped in a DeepSpeed engine with a torch AdamW and its schedule."""
    import deepspeed

    model, optimizer, schedule = _optimized(spec, steps_per_epoch)
    ds_config = deepspeed_config(spec.deepspeed, spec.batch_size, on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    return engine, ds_config


def train(spec: FinetuneSpec) -> None:
    """One Ray Train worker's fine-tune (`training.finetune.train_loop` hands it the spec)."""
    import deepspeed
    import ray.train
    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    torch.manual_seed(spec.seed)
    if spec.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = spec.tracking_uri

    sampler, loader = _loader(_encode(spec, spec.train_inputs, spec.train_targets,
                                      spec.soft_targets), spec, rank, world, shuffle=True)
    _, val_loader = _loader(_encode(spec, spec.val_inputs, spec.val_targets), spec, rank, world, False)
    engine, ds_config = _engine(spec, len(loader), on_gpu)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:  # an adapter's checkpoint holds no base weights
            _, client = engine.load_checkpoint(d, tag=TAG, load_module_strict=spec.lora is None)
        start_epoch, history = client["epoch"] + 1, client["history"]
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {client['epoch'] + 1}", flush=True)

    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad)  # ZeRO 3 holds shards
             for p in engine.module.parameters()]
    sizes = {"trainable_params": sum(n for n, trains in numel if trains),
             "params": sum(n for n, _ in numel)}
    for epoch in range(start_epoch, spec.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        seen, loss_sum = _epoch(engine, loader, device, spec, f"epoch {epoch + 1}/{spec.epochs}"
                                if rank == 0 else None)
        elapsed = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(len(loader), 1),
                   "val_loss": _val_loss(engine, val_loader, device, spec),
                   "samples_per_s": seen * world / elapsed, "resumed_from_epoch": start_epoch,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   **sizes}
        history = history + [metrics]
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=spec.lora is not None)
            if rank == 0:
                _save_config(engine.module, Path(d) / HF_DIR)
                spec.tokenizer.save_pretrained(Path(d) / HF_DIR)
                (Path(d) / "ds_config.json").write_text(json.dumps(ds_config))
            ray.train.report({**metrics, "history": history},
                             checkpoint=ray.train.Checkpoint.from_directory(d))
        if spec.after_epoch is not None:
            spec.after_epoch(rank, epoch + 1)


def _epoch(engine, loader, device, spec: FinetuneSpec, progress: str | None
           ) -> tuple[int, float]:
    """One pass over `loader`: (samples seen, summed loss); five progress lines when given
    their prefix (rank 0)."""
    seen, loss_sum, log_every = 0, 0.0, max(1, len(loader) // 5)
    for step, batch in enumerate(loader, 1):
        seen += len(batch["input_ids"])
        loss = _loss(engine, batch, device, spec)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().item()
        if progress and (step % log_every == 0 or step == len(loader)):
            print(f"{progress} step {step}/{len(loader)} loss {loss_sum / step:.4f}", flush=True)
    return seen, loss_sum


def _save_config(module, folder: Path) -> None:
    """The model's config (and an adapter's PEFT config): what consolidation rebuilds it from."""
    if hasattr(module, "peft_config"):
        module.peft_config["default"].save_pretrained(folder)
        module = module.get_base_model()
    module.config.save_pretrained(folder)


def consolidate(checkpoint_dir: Path, kind: str, out_dir: Path):
    """Full fp32 weights from a (possibly ZeRO-sharded) checkpoint, saved as a HF model folder
    (an adapter's checkpoint: the adapter, saved as PEFT's adapter folder)."""
    from transformers import AutoTokenizer

    ds_config = json.loads((checkpoint_dir / "ds_config.json").read_text())
    stage = ds_config["zero_optimization"]["stage"]
    adapter = lora.is_adapter(checkpoint_dir / HF_DIR)
    state_dict: dict[str, torch.Tensor] = {}
    if stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint_dir), tag=TAG, exclude_frozen_parameters=adapter)
    if stage < 3:
        # Below stage 3 the module states hold every weight; they supply stage 0 entirely, and
        # frozen weights, which stage 1 partitions leave out.
        module = torch.load(checkpoint_dir / TAG / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
        for key, value in module.items():
            state_dict.setdefault(key, value.float())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir / HF_DIR)
    if adapter:
        lora.save_adapter(checkpoint_dir / HF_DIR, state_dict, out_dir)
    else:
        model_from_state_dict(checkpoint_dir / HF_DIR, kind, state_dict).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return ds_config
