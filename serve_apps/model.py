"""The one contract every model deployment shares: load by reference (`training.refs`),
predict a batch, say who it is. Aliases are resolved to a version once, when the model loads,
so every answer names the exact version that produced it even if the alias moves meanwhile.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from serve_apps.adapters import Adapter, AdapterHost
from training.config import BUNDLED_ENCODER
from training.prompts import Chat
from training.refs import ModelIdentity, resolve


def device() -> torch.device:
    """CUDA when this process was given a GPU, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _one_at_a_time(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer and metadata, ready for batches. Calls take turns:
    a fast tokenizer keeps its padding and truncation settings as state, so two batches
    tokenized at once in different threads can garble each other; and a generation runs
    with its LoRA adapters attached (`serve_apps/adapters.py`), which are state of the modules."""

    identity: ModelIdentity
    model: torch.nn.Module
    tokenizer: object
    meta: dict
    precision: str = "fp32"
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    adapters: AdapterHost = field(default_factory=AdapterHost, repr=False, compare=False)
    thresholds: dict[tuple, float | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @_one_at_a_time
    def classify(self, texts: Sequence[str], error_rate: float | None = None,
                 priors: Mapping[str, float] | None = None) -> list[dict]:
        """Label, calibrated confidence and scores per text, and its drift features (descriptors,
        the projected embedding and the posterior under the training priors: what the inference
        log keeps instead of the text). With an `error_rate` and a calibrated model,
        `candidates`: the conformal prediction set, and `abstained` when it is not exactly one
        label. `priors` (`{label: new prior / training prior}`, `training/priors.py`) adjusts
        the answer to a label shift."""
        from training.calibration import prediction_set, temperature
        from training.features import EMBEDDING_DIMS, input_features
        from training.models import classify
        from training.priors import adjust, weights

        out = classify(self.model, self.tokenizer, texts, self.meta["max_length"],
                       batch_size=max(len(texts), 1), embedding_dims=EMBEDDING_DIMS,
                       temperature=temperature(self.meta))
        labels = self.meta["labels"]
        probs = adjust(out.probs, weights(labels, priors)) if priors else out.probs
        q = self._threshold(error_rate, priors) if error_rate else None
        sets = [None if q is None else [labels[i] for i in prediction_set(p, q)] for p in probs]
        return [{"label": labels[int(p.argmax())], "confidence": round(float(p.max()), 6),
                 "scores": {lbl: round(float(x), 6) for lbl, x in zip(labels, p)},
                 **({} if s is None else {"candidates": s, "abstained": len(s) != 1}),
                 "features": {**features, "posterior": [round(float(x), 6) for x in raw]},
                 "tokens": int(n)}
                for p, raw, s, features, n in zip(probs, out.probs, sets,
                                                  input_features(texts, out), out.tokens)]

    def _threshold(self, error_rate: float, priors: Mapping[str, float] | None = None
                   ) -> float | None:
        """The conformal threshold at `error_rate` (None: uncalibrated) for answers adjusted
        to `priors` (`Calibration.under`), once per rate and priors."""
        from training.calibration import Calibration

        key = (error_rate, tuple(sorted((priors or {}).items())))
        if key not in self.thresholds:
            calibration = Calibration.served(self.meta, priors)
            self.thresholds[key] = calibration and calibration.threshold(error_rate)
        return self.thresholds[key]

    @_one_at_a_time
    def generate(self, texts: Sequence[str], max_new_tokens: int, temperature: float, seed: int,
                 stop: Sequence[str], adapters: Sequence[Adapter | None] = ()) -> list[dict]:
        """Each text's answer, by its own adapter (`adapters`, None or absent: the base)."""
        from training.models import generate_text

        module, names = self.adapters.prepare(self.model, adapters or [None] * len(texts))
        outs = generate_text(module, self.tokenizer, texts, max_new_tokens, temperature, seed,
                             batch_size=max(len(texts), 1), adapter_names=names)
        results = []
        for text, out in zip(texts, outs):
            answer = finished(out.text, out.confidence, stop, out.ended)
            results.append({**answer, "prompt_tokens": self.prompt_tokens(text),
                            "completion_tokens": self.count_tokens(answer["text"])})
        return results

    @_one_at_a_time
    def stream(self, text: str | Chat, max_new_tokens: int, temperature: float, seed: int,
               stop: Sequence[str], piece_timeout_s: float, cancel: threading.Event,
               adapter: Adapter | None = None) -> Iterator[str]:
        """Pieces of `generate`'s answer as they appear; joined they equal its text. Setting
        `cancel` stops the generation. It holds the lock while it generates, as a batch does."""
        from training.models import stream_text

        def prepare():  # under the lock, right before generating
            module, names = self.adapters.prepare(self.model, [adapter])
            return module, {"adapter_names": names} if names else {}

        return until_stop(stream_text(self.model, self.tokenizer, text, max_new_tokens,
                                      temperature, seed, piece_timeout_s, cancel, self.lock,
                                      prepare), stop)

    @_one_at_a_time
    def embed_prompts(self, texts: Sequence[str], adapters: Sequence | None = None
                      ) -> list[list[float]]:
        """A generator's embedding of each prompt (`training.features.prompt_embeddings`) by
        the model that answers it: the base, or its adapter (`adapters[i]`, None: the base), as
        the adapter's registered profile embeds its prompts; the chat log keeps it for drift
        checks."""
        from training.features import prompt_embeddings

        module, names = self.adapters.prepare(self.model, adapters or [None] * len(texts))
        return prompt_embeddings(module, self.tokenizer, texts, self.meta.get("max_length"),
                                 **({"adapter_names": names} if names else {})).tolist()

    @_one_at_a_time
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @_one_at_a_time
    def prompt_tokens(self, text: str | Chat) -> int:
        """Tokens of the prompt a generator actually reads for `text`."""
        from training.features import prompt_tokens

        return prompt_tokens(self.tokenizer, text)

    @_one_at_a_time
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's recipe)."""
        from training.models import sentence_embeddings

        return sentence_embeddings(self.model, self.tokenizer, texts, self.meta["max_length"],
                                   batch_size=max(len(texts), 1))


def finished(text: str, confidence: float, stop: Sequence[str], ended: bool) -> dict:
    """A generated text as an answer: cut before its first stop sequence (`finish_reason`
    "stop"), else whole: "stop" where the model `ended` it, "length" where the token limit
    did."""
    cut = min([text.find(s) for s in stop if s and s in text], default=-1)
    return {"text": text[:cut].strip() if cut >= 0 else text,
            "finish_reason": "stop" if cut >= 0 or ended else "length",
            "confidence": confidence}


class StopTrimmer:
    """Streamed text trimmed like `generate`: no surrounding blanks, nothing from a stop
    sequence on. Holds back just enough characters to see a stop sequence arrive."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buffer, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        """What of the text so far can be sent now ("" while held back or once stopped)."""
        if self.stopped:
            return ""
        self.buffer = (self.buffer + piece).lstrip() if not self.sent else self.buffer + piece
        cuts = [self.buffer.find(s) for s in self.stop if s in self.buffer]
        if cuts:
            self.stopped = True
            return self._upto(len(self.buffer[:min(cuts)].rstrip()))
        return self._upto(min(len(self.buffer) - self.hold, len(self.buffer.rstrip())))

    def end(self) -> str:
        """The rest, once the generation ended."""
        return "" if self.stopped else self._upto(len(self.buffer.rstrip()))

    def _upto(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.buffer[self.sent:end], end
        return out


def until_stop(pieces: Iterable[str], stop: Sequence[str]) -> Iterator[str]:
    """`pieces` trimmed by a `StopTrimmer`; it stops reading them at a stop sequence."""
    trim = StopTrimmer(stop)
    for piece in pieces:
        if out := trim.feed(piece):
            yield out
        if trim.stopped:
            return
    if out := trim.end():
        yield out


def load(ref: str, tracking_uri: str | None, precision: str = "fp32") -> LoadedModel:
    """Resolve, download and load a model onto this process's device in `precision`."""
    identity = resolve(ref, tracking_uri)
    if identity.version == "bundled":
        from transformers import AutoModel, AutoTokenizer

        from training.models import resolve_source

        folder: Path = resolve_source(BUNDLED_ENCODER)
        model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        meta = {"kind": "encoder", "max_length": 128, "labels": []}
    else:
        import mlflow

        from training.pyfunc import load_hf
        from training.registry import download_hf_model

        mlflow.set_tracking_uri(tracking_uri)
        model, tokenizer, meta = load_hf(download_hf_model(identity.uri))
    dev = device()
    return LoadedModel(identity, with_precision(model.to(dev).eval(), meta["kind"], dev, precision),
                       tokenizer, meta, precision)


def with_precision(model: torch.nn.Module, kind: str, dev: torch.device,
                   precision: str) -> torch.nn.Module:
    """`auto`: fp16 on GPU, fp32 on CPU. `int8` (CPU): dynamic quantization of the linear
    layers, about 3x MiniLM's fp32 throughput here, but activations are scaled per batch, so a
    text's scores shift slightly with its batch neighbours; hence opt-in."""
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type == "cuda":
        return model.half()
    if precision == "int8" and dev.type == "cpu":
        import warnings

        with warnings.catch_warnings():  # torch suggests torchao; the eager API still works
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                          dtype=torch.qint8)
    return model
