"""Fine-tune throughput: DeepSpeed ZeRO 0 and 2 on 2 Ray Train workers against a plain
single-process PyTorch loop, same model, data and batch size, in one run.

    python bench/train.py --json [--samples 512] [--task support-router] [--tiny]

Prints samples/s per configuration (measured inside the training loop, so start-up is excluded;
wall seconds including start-up are shown too) and each one's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import runtime  # noqa: E402
from cluster.settings import load_settings  # noqa: E402
from training.config import DeepSpeedConfig, ModelSpec, TrainingConfig  # noqa: E402
from training.data import generate, labels_of  # noqa: E402
from training.finetune import FinetuneSpec, fit  # noqa: E402
from training.models import build_model, collate, encode_classification, load_tokenizer  # noqa: E402

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 128}


def plain_loop(spec: FinetuneSpec) -> float:
    """The baseline: one process, all cores, torch AdamW, no Ray, no DeepSpeed."""
    import torch

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, spec.kind, spec.labels, spec.tokenizer).train()
    rows = encode_classification(spec.tokenizer, spec.train_inputs, spec.train_targets,
                                 spec.model.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    started = time.perf_counter()
    for i in range(0, len(rows), spec.batch_size):
        loss = model(**collate(rows[i:i + spec.batch_size], spec.tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--task", default="support-router", help="whose model config to use")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer scratch model instead")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runtime.apply_platform_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    task = load_settings().training.tasks[args.task]
    model = ModelSpec(source="scratch", architecture=TINY) if args.tiny else task.model
    df = generate(task.dataset, "base", args.samples, seed=0)
    labels = labels_of(task.dataset)
    targets = [labels.index(v) for v in df.label]
    spec = FinetuneSpec(kind="classification", model=model,
                        tokenizer=load_tokenizer(model, "classification"), labels=labels,
                        train_inputs=list(df.text), train_targets=targets,
                        val_inputs=list(df.text[:32]), val_targets=targets[:32], epochs=1,
                        batch_size=args.batch_size, learning_rate=5e-5, weight_decay=0.0,
                        warmup_ratio=0.0, deepspeed=DeepSpeedConfig())

    baseline = plain_loop(spec)
    results = {"baseline_plain_pytorch": {"samples_per_s": round(baseline, 2), "ratio": 1.0}}
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        for stage in (0, 2):
            started = time.perf_counter()
            staged = FinetuneSpec(**{**spec.__dict__, "deepspeed": DeepSpeedConfig(stage=stage)})
            gpu = runtime.use_gpu("auto")
            result = fit(staged, name=f"bench-zero{stage}", storage_path=Path(storage),
                         workers=args.workers, use_gpu=gpu,
                         resources=TrainingConfig(cpus_per_worker=1).worker_resources(gpu),
                         max_failures=0)
            sps = result.metrics["samples_per_s"]
            results[f"deepspeed_zero{stage}_{args.workers}_workers"] = {
                "samples_per_s": round(sps, 2), "ratio": round(sps / baseline, 3),
                "wall_s_with_startup": round(time.perf_counter() - started, 1)}
    ray.shutdown()
    report = {"benchmark": "finetune_throughput", "task": args.task, "model": model.model_dump(),
              "samples": args.samples, "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "results": results}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
