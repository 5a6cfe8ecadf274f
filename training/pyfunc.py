"""The MLflow pyfunc wrapper every registered model is logged with.

The Hugging Face folder travels as the `hf` artifact, next to `llmops.json` (task kind, labels,
max length), so any MLflow client can `mlflow.pyfunc.load_model("models:/NAME@champion")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

META_FILE = "llmops.json"
GENERATION_PARAMS = {"max_new_tokens": 48, "temperature": 0.0, "seed": 0}


def write_meta(folder: Path, meta: dict) -> None:
    """Describe a HF folder for `TaskModel`: task kind, labels, max length."""
    (folder / META_FILE).write_text(json.dumps(meta))


def load_hf(folder: Path):
    """Model, tokenizer and metadata from an `hf` artifact folder."""
    from transformers import AutoTokenizer

    from training.models import auto_class

    meta = json.loads((folder / META_FILE).read_text())
    if "base" in meta:  # a LoRA adapter: on the base it was trained on
        from training.lora import load_adapted

        model = load_adapted(folder, meta)
    else:
        model = auto_class(meta["kind"]).from_pretrained(folder).eval()
    return model, AutoTokenizer.from_pretrained(folder), meta


class TaskModel(mlflow.pyfunc.PythonModel):
    """`predict(DataFrame[text])`: label, confidence and per-class probabilities for
    classifiers (param `priors`: `{label: new / training prior}` adjusts them to a label
    shift, `training/priors.py`); the generated text and its confidence for language models
    (params: max_new_tokens, temperature, seed)."""

    @classmethod
    def from_folder(cls, folder: Path) -> TaskModel:
        """The same model outside MLflow (to infer the signature before logging)."""
        task_model = cls()
        task_model.model, task_model.tokenizer, task_model.meta = load_hf(folder)
        return task_model

    def load_context(self, context) -> None:
        self.model, self.tokenizer, self.meta = load_hf(Path(context.artifacts["hf"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from training.calibration import temperature
        from training.models import generate_text, predict_proba  # torch only where models run
        from training.priors import adjust, weights

        texts = [str(t) for t in model_input["text"]]
        if self.meta["kind"] == "classification":
            probs = predict_proba(self.model, self.tokenizer, texts, self.meta["max_length"],
                                  temperature=temperature(self.meta))
            labels = self.meta["labels"]
            if (params or {}).get("priors"):
                probs = adjust(probs, weights(labels, params["priors"]))
            out = pd.DataFrame(probs, columns=[f"prob_{lbl}" for lbl in labels])
            out.insert(0, "confidence", probs.max(axis=1) if len(texts) else [])
            out.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)])
            return out
        p = {**GENERATION_PARAMS, **(params or {})}
        out = generate_text(self.model, self.tokenizer, texts, int(p["max_new_tokens"]),
                            float(p["temperature"]), int(p["seed"]))
        return pd.DataFrame([(g.text, g.confidence) for g in out], columns=["text", "confidence"])
