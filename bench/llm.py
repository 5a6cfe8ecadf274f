"""Language models on one tiny Llama, in one run: LoRA against a full fine-tune, and generation
with continuous batching against one request at a time and one `generate` per batch.

    python bench/llm.py --json [--parts train,generate,swap] [--samples 512] [--stage 2]
                               [--width 1024]

The base is a Llama built from a config (random weights: throughput and sizes do not depend on
what the weights hold), 4 layers of `--width` (1024: 49.8 M parameters; 512: 13.1 M), with a
tokenizer trained on the rewriter's corpus, saved as a local model folder, the way a user's own
base arrives. LoRA's advantage grows with the width: the weight gradients, their all-reduce and
AdamW that it saves grow with the parameters, the activations it still runs through with the
tokens.

train: per method, trainable parameters, samples/s measured inside the training loop (start-up
excluded), the last checkpoint's bytes, and the peak resident memory of a worker; ratios are
LoRA over full (same data, batch size, DeepSpeed stage and workers).

generate: answer tokens/s of greedy answers at 1, 8 and 32 concurrent callers, in this process,
through what a generator replica runs: the continuous batch (`serve_apps/engine.py`: every
caller sends its next request as soon as its answer arrives), one request at a time
(`LoadedModel.generate` on one text), and one `generate` per batch (what `@serve.batch` does
where continuous batching is off: the callers' requests, up to 16, start together and all
wait for the batch's end). Answers end after 8, 16, 32 or 64 tokens in turn (`--new-tokens`:
the longest), as answers ending at their EOS do: a batch runs until its longest answer ends,
and only each answer's own tokens count. Twice: by the base alone, and by two LoRA adapters
(rank 8 on q and v, random weights) and the base in turn, a third of the requests each.

swap: the base registered, two LoRA adapter versions on it (random weights, registered as a
LoRA fine-tune registers one), the chat application serving the adapter by name from one
generator replica (`--threads`: its torch threads, `resources.threads`); `--callers` HTTP
clients ask for the adapter while its alias moves to the second version and `llmops swap` pins
it. Reported: failed requests, p99 before / during / after the command, the command's seconds,
when the first answer by the new version arrived (after the command began, and after it
returned: the new adapter loads on first use), when the switch happened as the callers saw it
(the first request the new version answered and the last the old one did, by when they were
sent), and old answers after the command returned.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import runtime  # noqa: E402
from training.config import DeepSpeedConfig, LoraSpec, ModelSpec, TrainingConfig  # noqa: E402
from training.data import generate  # noqa: E402
from training.finetune import FinetuneSpec, fit  # noqa: E402
from training.models import build_model, load_tokenizer, train_bpe_tokenizer  # noqa: E402


def llama(width: int) -> dict:
    """The tiny Llama of `width`: 4 layers, heads of 64, 2 query heads per KV head, Llama's MLP
    ratio (1408 at 512 wide)."""
    return {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": width,
            "intermediate_size": width * 11 // 4, "num_attention_heads": width // 64,
            "num_key_value_heads": width // 128, "max_position_embeddings": 256}


def base_folder(folder: Path, corpus: list[str], architecture: dict) -> Path:
    tokenizer = train_bpe_tokenizer(corpus, 2000)
    build_model(ModelSpec(source="scratch", architecture=architecture), "causal-lm", [],
                tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def generation(base: Path, prompts: list[str], new_tokens: int, seconds: float,
               storage: Path) -> dict:
    """Tokens/s per mode and concurrency, by the base and by a mix of two adapters and the base
    (see the module's docstring)."""
    from serve_apps.model import LoadedModel
    from training.pyfunc import load_hf, write_meta
    from training.refs import ModelIdentity

    write_meta(base, {"kind": "causal-lm", "labels": [], "max_length": 96})
    model, tokenizer, meta = load_hf(base)
    loaded = LoadedModel(ModelIdentity("bench", "1"), model, tokenizer, meta)
    lengths = [new_tokens // 8, new_tokens // 4, new_tokens // 2, new_tokens]
    adapters = [None, *(_loaded_adapter(base, storage / f"mix{s}", s) for s in (1, 2))]
    out = {}
    for name, mix in (("base", [None]), ("adapters", adapters)):
        cells = _cells(loaded, prompts, lengths, mix, seconds, new_tokens)
        cells["continuous_vs_per_batch_c32"] = round(cells["continuous"][32]
                                                     / cells["per_batch"][32], 2)
        out[name] = cells
    out["base"]["continuous_vs_one_at_a_time_c32"] = round(
        out["base"]["continuous"][32] / out["base"]["one_at_a_time"], 2)
    return out


def _cells(loaded, prompts: list[str], lengths: list[int], mix: list, seconds: float,
           new_tokens: int) -> dict:
    """Tokens/s one request at a time, per batch and continuously at 1, 8 and 32 callers; the
    i-th request asks about the i-th prompt for the i-th length by the i-th of `mix` (adapters,
    None: the base), in turn."""
    import asyncio

    from serve_apps.engine import ContinuousEngine
    from serve_apps.model_config import GenerationConfig

    def request(i: int) -> tuple[str, int, object]:
        return prompts[i % len(prompts)], lengths[i % len(lengths)], mix[i % len(mix)]

    def batches(size: int) -> float:
        done, started, i = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            wanted = [request(i + k) for k in range(size)]
            loaded.generate([w[0] for w in wanted], max(w[1] for w in wanted), 0.0, 0, [],
                            adapters=[w[2] for w in wanted])
            done += sum(w[1] for w in wanted)  # each answer's own tokens: the rest is waste
            i += size
        return done / (time.perf_counter() - started)

    async def continuous(callers: int) -> float:
        engine = ContinuousEngine(loaded, GenerationConfig(max_new_tokens=new_tokens))
        await engine.generate(request(0)[0], 4, [])  # its cache is allocated on the first request
        done, started = [0], time.perf_counter()

        async def caller(i: int) -> None:
            while time.perf_counter() - started < seconds:
                text, tokens, adapter = request(i)
                await engine.generate(text, tokens, [], adapter)
                done[0] += tokens
                i += callers

        await asyncio.gather(*(caller(k) for k in range(callers)))
        rate = done[0] / (time.perf_counter() - started)
        await engine.close()
        return rate

    batches(1)  # warm-up
    out = {"one_at_a_time": round(batches(1), 1), "per_batch": {}, "continuous": {}}
    for c in (1, 8, 32):
        out["per_batch"][c] = round(batches(min(c, 16)), 1)
        out["continuous"][c] = round(asyncio.run(continuous(c)), 1)
    return out


def _loaded_adapter(base: Path, folder: Path, seed: int):
    """A random LoRA adapter of `base` as a replica holds one after fetching it."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from serve_apps.adapters import Adapter
    from training.lora import ADAPTER_WEIGHTS
    from training.refs import ModelIdentity

    _adapter("models:/bench/1", base, folder, seed)
    return Adapter(ModelIdentity(f"mix{seed}", "1", base="models:/bench/1"),
                   LoraConfig.from_pretrained(folder), load_file(folder / ADAPTER_WEIGHTS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="train,generate,swap")
    parser.add_argument("--callers", type=int, default=8, help="HTTP clients during the swap")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch's threads in the swap's generator replica (resources.threads)")
    parser.add_argument("--phase", type=float, default=8.0, help="seconds before and after it")
    parser.add_argument("--port", type=int, default=8031)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="per generation cell")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024, choices=[256, 512, 768, 1024, 2048])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runtime.apply_platform_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    df = generate("moderation", "base", args.samples, seed=0, priors={"toxic": 1.0})
    parts = set(args.parts.split(","))
    report: dict = {"model": llama(args.width)}
    with tempfile.TemporaryDirectory() as storage:
        base = base_folder(Path(storage) / "base", [f"{t} {r}" for t, r in zip(df.text, df.rewrite)],
                           report["model"])
        if "train" in parts:
            report["train"] = training(args, df, base, storage)
        if "generate" in parts:
            report["generate"] = {"new_tokens": args.new_tokens, "seconds_per_cell": args.seconds,
                                  "tokens_per_s": generation(base, list(df.text), args.new_tokens,
                                                             args.seconds, Path(storage))}
        if "swap" in parts:
            report["swap"] = adapter_swap(args, base, Path(storage))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


def training(args, df, base: Path, storage: str) -> dict:
    """LoRA against a full fine-tune (see the module's docstring)."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results = {}
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
    ray.shutdown()
    full, lora = results["full"], results["lora"]
    return {"samples": args.samples, "batch_size": args.batch_size,
            "deepspeed_stage": args.stage, "workers": args.workers, "lora_rank": args.rank,
            "gpu": gpu, "methods": results, "lora_vs_full": {
                "samples_per_s": round(lora["samples_per_s"] / full["samples_per_s"], 3),
                "trainable_params": round(lora["trainable_params"] / full["trainable_params"], 5),
                "checkpoint_bytes": round(lora["checkpoint_bytes"] / full["checkpoint_bytes"], 4),
                "peak_rss_mb_worker": round(lora["peak_rss_mb_worker"] /
                                            full["peak_rss_mb_worker"], 3)}}


def _adapter(base_ref: str, base: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter of the registered base with random (large) weights, saved as a fine-tune
    saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM"))
    peft.peft_config["default"].base_model_name_or_path = base_ref
    peft.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def adapter_swap(args, base: Path, storage: Path) -> dict:
    """An adapter's version swapped under load (see the module's docstring)."""
    import asyncio

    import ray
    from stack import start_ray, swap_under_load

    from cluster.settings import load_settings
    from serve_apps.config import ServeConfig
    from serve_apps.deploy import serve_config
    from training.job import register_model_dir
    from training.refs import reference
    from training.registry import Registry
    from training.taskdata import build_task_data

    small = {"train_size": 32, "holdout_size": 16, "golden_size": 16, "holdouts": ["base"]}
    lora = {"dataset": "moderation", "kind": "causal-lm", "label_priors": {"toxic": 1.0},
            "method": "lora", "model": {"source": "models:/rewriter@champion", "max_length": 64},
            **small}
    settings = load_settings(overrides={"data_dir": str(storage / "state"), "training": {
        "tasks": {"rewriter": {"model": {"source": str(base), "max_length": 64}, **small},
                  "rewriter-a": lora}}})
    registry = Registry(settings.registry, settings.data_dir)

    def register(task: str, folder: Path) -> int:
        return register_model_dir(settings.training, registry, task,
                                  build_task_data(settings.training, task), folder, [],
                                  history=[], ds_config={}, started=time.perf_counter()).version

    base_ref = reference("rewriter", register("rewriter", base))
    v1, v2 = (register("rewriter-a", _adapter(base_ref, base, storage / f"a{s}", s)) for s in (1, 2))
    config = ServeConfig.model_validate({
        "port": args.port, "use_gpu": "no", "moderation": {"enabled": False},
        "support": {"enabled": False}, "feedback": {"enabled": False},
        "advisor": {"enabled": False},
        "chat": {"generator": {"model": "models:/rewriter@champion", "placement": "replica",
                               "adapters": {"toxic-a": "models:/rewriter-a@champion"},
                               "resources": {"threads": args.threads},
                               "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}})
    cluster = start_ray(settings)
    cluster.deploy(serve_config(config, registry.tracking_uri, False,
                                dict(runtime.PLATFORM_ENV)), timeout_s=600)
    try:
        result = asyncio.run(swap_under_load(
            f"{config.url}/v1/chat/completions", lambda i: {
                "model": "toxic-a", "max_tokens": 8,
                "messages": [{"role": "user", "content": f"nobody asked {i}"}]},
            lambda answer: answer["llmops"]["model"]["version"], args.callers, args.phase,
            lambda: swap_alias(cluster, registry, v2), str(v2)))
    finally:
        cluster.shutdown()
        ray.shutdown()
    del result["result"]
    return {"callers": args.callers, "phase_s": args.phase, "versions": [v1, v2], **result}


def swap_alias(cluster, registry, version: int) -> dict:
    """The adapter's alias moved to `version`, then `llmops swap --alias champion`."""
    from serve_apps.deploy import swap

    registry.set_alias("rewriter-a", "champion", version)
    return swap(cluster, "rewriter-a", registry.tracking_uri, alias="champion")


if __name__ == "__main__":
    main()
