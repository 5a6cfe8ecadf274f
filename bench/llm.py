"""Language-model fine-tunes: LoRA against a full fine-tune of the same tiny Llama, same data,
batch size, DeepSpeed stage and workers, in one run.

    python bench/llm.py --json [--samples 512] [--stage 2] [--workers 2]

The base is a Llama built from a config (random weights: throughput and sizes do not depend on
what the weights hold) with a tokenizer trained on the rewriter's corpus, saved as a local model
folder, the way a user's own base arrives. Per method: trainable parameters, samples/s measured
inside the training loop (start-up excluded), the last checkpoint's bytes, and the peak resident
memory of a worker; ratios are LoRA over full.
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
from training.config import DeepSpeedConfig, LoraSpec, ModelSpec, TrainingConfig  # noqa: E402
from training.data import generate  # noqa: E402
from training.finetune import FinetuneSpec, fit  # noqa: E402
from training.models import build_model, load_tokenizer, train_bpe_tokenizer  # noqa: E402

LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 512,
         "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4,
         "max_position_embeddings": 256}


def base_folder(folder: Path, corpus: list[str]) -> Path:
    tokenizer = train_bpe_tokenizer(corpus, 2000)
    build_model(ModelSpec(source="scratch", architecture=LLAMA), "causal-lm", [],
                tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runtime.apply_platform_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    df = generate("moderation", "base", args.samples, seed=0, priors={"toxic": 1.0})
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        base = base_folder(Path(storage) / "base", [f"{t} {r}" for t, r in zip(df.text, df.rewrite)])
        model = ModelSpec(source=str(base), max_length=96)
        spec = FinetuneSpec(kind="causal-lm", model=model,
                            tokenizer=load_tokenizer(model, "causal-lm"), labels=[],
                            train_inputs=list(df.text), train_targets=list(df.rewrite),
                            val_inputs=list(df.text[:32]), val_targets=list(df.rewrite[:32]),
                            epochs=1, batch_size=args.batch_size, learning_rate=1e-3,
                            weight_decay=0.0, warmup_ratio=0.0,
                            deepspeed=DeepSpeedConfig(stage=args.stage))
        gpu = runtime.use_gpu("auto")
        for method, adapter in (("full", None), ("lora", LoraSpec(rank=args.rank))):
            started = time.perf_counter()
            result = fit(FinetuneSpec(**{**spec.__dict__, "lora": adapter}), name=f"bench-{method}",
                         storage_path=storage, workers=args.workers, use_gpu=gpu,
                         resources=TrainingConfig(cpus_per_worker=1).worker_resources(gpu),
                         max_failures=0)
            m = result.metrics
            results[method] = {
                "trainable_params": m["trainable_params"], "params": m["params"],
                "trainable_share": round(m["trainable_params"] / m["params"], 5),
                "samples_per_s": round(m["samples_per_s"], 2),
                "checkpoint_bytes": _bytes(result.checkpoint.path),
                "peak_rss_mb_worker": round(m["peak_rss_mb"], 1),
                "wall_s": round(time.perf_counter() - started, 1)}
    full, lora = results["full"], results["lora"]
    report = {"model": LLAMA, "samples": args.samples, "batch_size": args.batch_size,
              "deepspeed_stage": args.stage, "workers": args.workers, "lora_rank": args.rank,
              "gpu": gpu, "methods": results, "lora_vs_full": {
                  "samples_per_s": round(lora["samples_per_s"] / full["samples_per_s"], 3),
                  "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 5),
                  "checkpoint_bytes": round(lora["checkpoint_bytes"] / full["checkpoint_bytes"], 4),
                  "peak_rss_mb_worker": round(lora["peak_rss_mb_worker"] /
                                              full["peak_rss_mb_worker"], 3)}}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
