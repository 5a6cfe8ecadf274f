"""The golden set: fixed rows a model version is measured on when it is registered and again by
the health check, through the same function, so the two sets of figures compare.

Rows come from the seeded generator (the `base` scenario, a seed of its own, the task's label
mix) and are logged with the version (`data/golden.parquet`), so the set travels with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from training import data as datagen
from training.config import TaskConfig

GOLDEN_SEED = 7919
BATCH_SIZE = 16
# The quality figure of each kind of model: share of labels right, share of texts generated
# exactly as the reference.
QUALITY = {"classification": "accuracy", "causal-lm": "exact_match"}


def golden_set(tc: TaskConfig) -> pd.DataFrame:
    return datagen.generate(tc.dataset, "base", tc.golden_size, GOLDEN_SEED, priors=tc.label_priors)


def measure(predict: Callable[[pd.DataFrame], pd.DataFrame], golden: pd.DataFrame,
            kind: str) -> dict[str, float]:
    """Quality, mean confidence and the latency of one batch of `BATCH_SIZE` texts (p50, p99;
    after one warm-up batch; a last, smaller batch is not timed)."""
    predict(golden[["text"]].iloc[:BATCH_SIZE])
    outputs, seconds = [], []
    for start in range(0, len(golden), BATCH_SIZE):
        batch = golden[["text"]].iloc[start:start + BATCH_SIZE]
        began = time.perf_counter()
        outputs.append(predict(batch))
        if len(batch) == BATCH_SIZE or not seconds:
            seconds.append(time.perf_counter() - began)
    out = pd.concat(outputs, ignore_index=True)
    if kind == "classification":
        right = out["label"].to_numpy() == golden["label"].to_numpy()
    else:
        right = out["text"].str.strip().to_numpy() == golden["rewrite"].str.strip().to_numpy()
    ms = np.array(seconds) * 1000
    return {QUALITY[kind]: float(right.mean()), "confidence": float(out["confidence"].mean()),
            "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99))}
