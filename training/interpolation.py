"""A retrained version keeps a share of the champion it started from: its weights become
(1 - w) x the fine-tuned ones + w x the champion's (weight-space ensembling, WiSE-FT: Wortsman
et al., CVPR 2022). A retrain learns from a few labels per new phrasing; a phrasing no label
reached is answered however the fine-tune happened to move it: the same retraining set gave
new-product 0.959 on two workers and 0.997 on one (docs/closed-loop.md). Part of the way back
to the champion, the labelled moves stay learnt and what no label spoke about keeps the
champion's answer. Not where feedback contradicts the champion (a concept shift): there its
weights hold the superseded concept; nor where it costs rows of the validation set (`keep`)."""

from __future__ import annotations

import json
from pathlib import Path

from training.pyfunc import META_FILE

WEIGHTS = "model.safetensors"


def champion_share(weight: float, notes: dict, tuned: Path, champion: Path | None,
                   labels: list[str]) -> float:
    """The share of the champion's weights a retrained version keeps: `weight`, or 0 where
    the retraining set found a concept shift (`notes`), where the champion is no full-weight
    folder with these `labels` in this order (a LoRA adapter, another head), or where the
    two folders' weights differ in names or shapes."""
    from safetensors import safe_open

    if not weight or notes.get("concept_shift") or champion is None:
        return 0.0
    if not ((champion / WEIGHTS).is_file() and (tuned / WEIGHTS).is_file()
            and (champion / META_FILE).is_file()):
        return 0.0
    if json.loads((champion / META_FILE).read_text()).get("labels") != labels:
        return 0.0
    with safe_open(champion / WEIGHTS, "pt") as a, safe_open(tuned / WEIGHTS, "pt") as b:
        if set(a.keys()) != set(b.keys()) or any(
                a.get_slice(k).get_shape() != b.get_slice(k).get_shape() for k in a.keys()):
            return 0.0
    return weight


def keep(tuned: Path, champion: Path, weight: float, errors) -> float:
    """Rewrite `tuned`'s weights as (1 - `weight`) x them + `weight` x `champion`'s (each in
    its own dtype; frozen weights are equal in both and stay as they were) where that costs
    no held-out row: `errors` (a model's weights -> how many validation rows it gets wrong) is
    no higher mixed than fine-tuned (WiSE-FT's share is chosen on held-out rows too). Weight
    space is only that forgiving where fine-tuning stays near its start (a pretrained encoder
    at a small learning rate); a small model trained from scratch at a high one lost its gain
    at the gate. The share kept: `weight` or 0."""
    from safetensors.torch import load_file, save_file

    mine, theirs = load_file(tuned / WEIGHTS), load_file(champion / WEIGHTS)
    mix = {k: ((1 - weight) * v.float() + weight * theirs[k].float()).to(v.dtype)
           if v.is_floating_point() else v for k, v in mine.items()}
    if errors(mix) > errors(mine):
        return 0.0
    save_file(mix, tuned / WEIGHTS, metadata={"format": "pt"})
    return weight
