"""Distributed fine-tuning: Ray Train `TorchTrainer` workers each drive a DeepSpeed ZeRO engine
(`training/worker.py`, what the workers run; this module is what the driver and Ray Train's
controller load, without torch).

Every epoch each worker saves its ZeRO shard and reports it; Ray Train merges the shards into one
checkpoint directory, restarts failed workers from the latest one (`FailureConfig`), and the final
checkpoint is consolidated to full fp32 weights with DeepSpeed's `zero_to_fp32`. A LoRA fine-tune
(`FinetuneSpec.lora`) trains, checkpoints and consolidates the adapter alone: the frozen base is
rebuilt from its source on each start, never written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import DeepSpeedConfig, LoraSpec, ModelSpec
from training.errors import TrainingFailed

TAG = "state"  # the DeepSpeed checkpoint's tag in every checkpoint folder
HF_DIR = "hf"  # the model's config and tokenizer beside it


@dataclass
class FinetuneSpec:
    """Everything a worker needs; small enough to ship inside `train_loop_config`."""

    kind: str
    model: ModelSpec
    tokenizer: Any
    labels: list[str]
    train_inputs: list[str]
    train_targets: list
    val_inputs: list[str]
    val_targets: list
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    deepspeed: DeepSpeedConfig
    seed: int = 0
    tracking_uri: str | None = None
    lora: LoraSpec | None = None  # None: every weight trains
    # distillation (`training/distill.py`): the teacher's probabilities per training row at
    # `distill_temperature`, weighed `distill_alpha` against the true labels
    soft_targets: list[list[float]] | None = None
    distill_temperature: float = 1.0
    distill_alpha: float = 0.0
    # called on every worker as (rank, epoch) once an epoch's checkpoint is reported: where the
    # tests kill a worker to prove resume; it travels pickled, so a test can define it locally
    after_epoch: Callable[[int, int], None] | None = None


@dataclass
class FinetuneResult:
    model_dir: Path
    checkpoint: str  # the last checkpoint, a path of the storage's filesystem
    history: list[dict] = field(default_factory=list)
    ds_config: dict = field(default_factory=dict)


def train_loop(config: dict) -> None:
    """The per-worker function `TorchTrainer` runs. The spec travels through the object store
    and the work lives in `training.worker`, so the controller, which unpickles this function
    and its config, loads neither torch nor transformers (docs/performance.md)."""
    import ray

    from training.worker import train

    train(ray.get(config["spec"]))


def fit(spec: FinetuneSpec, *, name: str, storage_path: str, workers: int, use_gpu: bool,
        resources: dict[str, float], max_failures: int, callbacks: list | None = None):
    """Run the workers on the connected Ray cluster, each asking for `resources`
    (`TrainingConfig.worker_resources`); the Ray Train `Result`."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": ray.put(spec)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; the user needs the cause on one line
        raise TrainingFailed(f"fine-tune {name!r} failed: {_root_cause(exc)}") from exc
    if result.checkpoint is None:
        raise TrainingFailed(f"fine-tune {name!r} produced no checkpoint")
    return result


def _filesystem(storage: str):
    """(pyarrow filesystem, path in it) of a local folder or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def run_names(storage: str, prefix: str) -> list[str]:
    """The runs under `storage` whose names start with `prefix` (to resume one)."""
    import pyarrow.fs

    fs, root = _filesystem(storage)
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = (Path(i.path).name for i in found if i.type == pyarrow.fs.FileType.Directory)
    return sorted(n for n in names if n.startswith(prefix))


@contextmanager
def consolidated(checkpoint_path: str, storage: str, name: str,
                 kind: str) -> Iterator[tuple[Path, dict]]:
    """Consolidate the checkpoint at `checkpoint_path` (a path of `storage`'s filesystem) to a
    model folder on this machine: beside the run's checkpoints when they are local, else a
    scratch folder removed on exit (the registry keeps the copy that lasts).
    (model folder, DeepSpeed config)."""
    import ray.train

    from training.worker import consolidate

    fs, _ = _filesystem(storage)
    local = "://" not in storage
    with (nullcontext(str(Path(storage, name, "model"))) if local
          else tempfile.TemporaryDirectory(prefix=f"{name}-")) as model_dir:
        with ray.train.Checkpoint(checkpoint_path, filesystem=fs).as_directory() as folder:
            ds_config = consolidate(Path(folder), kind, Path(model_dir))
        yield Path(model_dir), ds_config


@contextmanager
def run_finetune(spec: FinetuneSpec, *, name: str, storage_path: str,
                 **fit_kwargs) -> Iterator[FinetuneResult]:
    """Fit, then consolidate the last checkpoint to a full-weight model folder (see
    `consolidated` for how long it lasts)."""
    result = fit(spec, name=name, storage_path=storage_path, **fit_kwargs)
    with consolidated(result.checkpoint.path, storage_path, name, spec.kind) as (model_dir, ds):
        yield FinetuneResult(model_dir=model_dir, checkpoint=result.checkpoint.path,
                             history=result.metrics.get("history", []), ds_config=ds)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
