"""Cost of drift checks and of the inference log, in one run.

    python bench/drift.py --json [--data-dir DIR] [--duration 8]

1. Seconds per `check_window` (every Evidently metric, KL, HTML not saved) for windows of 1k, 5k
   and 20k requests: as configured (windows above `sample_rows` are checked on a random sample
   of that many) and, where memory allows, on every row (the baseline).
2. Per embedding drift method Evidently offers (mmd, distance, ratio, model): seconds on a
   2k-row window and its score on clean traffic and on 50% new-product traffic.
3. Confidence drift (`check_window`'s rule: normed Wasserstein and energy distance, both past
   their thresholds, against the normed Wasserstein alone) on 20 clean windows of 500 requests
   and on windows of each drift scenario, for the champion as served and as more confident
   versions would answer (its posteriors, reference's and windows' alike, sharpened to
   temperatures 0.7 and 0.5: a promoted retrain's confidences spread over a hundredth or
   less); and on every window of every router version in the data dir's inference log (what
   the loop's runs served), each against its version's reference profile.
4. Logging overhead: `support` and `moderation` pipeline throughput over handles at concurrency
   32 with the inference log off and on, measured off, on, on, off (so warm-up and drift over
   the run weigh on both sides equally); the cost is 1 - mean(on) / mean(off).

Features come from the support router (the `--data-dir` champion and its registered reference
profile, else the configured architecture untrained) on texts of the seeded generator; large
windows are drawn with replacement from 4k computed rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import measure_handles  # noqa: E402
from stack import PIPELINES, platform, sample_texts, start_ray  # noqa: E402

from cluster import runtime  # noqa: E402
from monitoring.config import DriftThresholds  # noqa: E402
from monitoring.drift import check_window, embedding_frame  # noqa: E402
from training.data import generate  # noqa: E402
from training.features import reference_profile  # noqa: E402


def features(model, scenario: str, n: int, seed: int, fraction: float = 1.0) -> pd.DataFrame:
    df = generate("support-tickets", scenario, n, seed=seed, fraction=fraction)
    rows = []
    for i in range(0, n, 64):
        out = model.classify(list(df.text[i:i + 64]))
        rows += [{**o["features"], "prediction": o["label"], "confidence": o["confidence"]}
                 for o in out]
    frame = pd.DataFrame(rows)
    frame["ts"] = pd.Timestamp.now(tz="UTC")
    return frame


def timed_check(window: pd.DataFrame, reference: pd.DataFrame, sample_rows: int) -> float:
    report = check_window(window, reference, DriftThresholds(), model="support-router",
                          version="bench", min_rows=1, sample_rows=sample_rows)
    return report.seconds


def embedding_methods(clean: pd.DataFrame, shifted: pd.DataFrame, big: pd.DataFrame,
                      reference: pd.DataFrame) -> dict:
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    ref = embedding_frame(reference)
    out = {}
    for name, method in {"mmd": MMDDriftMethod(), "distance": DistanceDriftMethod(),
                         "ratio": RatioDriftMethod(), "model": ModelDriftMethod()}.items():
        started = time.perf_counter()
        method(embedding_frame(big), ref)
        seconds = time.perf_counter() - started
        scores = {label: method(embedding_frame(w), ref) for label, w in
                  (("clean_500", clean), ("new_product_50pct_500", shifted))}
        out[name] = {"seconds_2k_rows": round(seconds, 3),
                     **{k: {"score": round(float(v[0]), 5), "drift": bool(v[1])}
                        for k, v in scores.items()}}
    return out


def confidence_verdict(report) -> dict:
    """One window's confidence distances, the normed one's verdict alone and the rule's."""
    normed, energy = report.metric("confidence_drift"), report.metric("confidence_energy")
    return {"normed_wasserstein": normed.value, "energy": energy.value,
            "normed_alone_drifts": normed.value >= normed.threshold, "drifts": normed.drifted}


def confidence_rules(reference: pd.DataFrame, clean: list[pd.DataFrame],
                     scenarios: dict[str, pd.DataFrame]) -> dict:
    """Per spread of confidence: how often each rule drifts on clean windows, and its verdict
    on each scenario's window."""
    t = DriftThresholds()

    def sharpened(df: pd.DataFrame, temperature: float) -> pd.DataFrame:
        p = np.stack(df.posterior.to_numpy()) ** (1 / temperature)
        return df.assign(confidence=(p / p.sum(axis=1, keepdims=True)).max(axis=1))

    def verdicts(window: pd.DataFrame, ref: pd.DataFrame) -> dict:
        return confidence_verdict(check_window(window, ref, t, model="support-router",
                                               version="bench", min_rows=1))

    out = {}
    for temperature in (1.0, 0.7, 0.5):
        ref = sharpened(reference, temperature)
        quiet = [verdicts(sharpened(w, temperature), ref) for w in clean]
        out[f"temperature_{temperature}"] = {
            "reference_confidence_std": round(float(ref.confidence.std()), 4),
            "clean_windows": len(quiet),
            "clean_drifted": {"normed_alone": sum(v["normed_alone_drifts"] for v in quiet),
                              "both": sum(v["drifts"] for v in quiet)},
            "clean_max": {"normed_wasserstein": max(v["normed_wasserstein"] for v in quiet),
                          "energy": max(v["energy"] for v in quiet)},
            "scenarios": {k: verdicts(sharpened(w, temperature), ref)
                          for k, w in scenarios.items()}}
    return out


def logged_windows(settings, registry, model: str = "support-router") -> dict:
    """Both confidence rules on each logged window of each version, against its profile as
    the monitor reads it; the windows where they disagree."""
    from monitoring.drift import version_reference, windows
    from monitoring.log import read

    config = settings.monitoring.drift
    log = read(settings.log_uri, model=model, outcome="ok")
    verdicts, disagree = [], []
    for version, served in log.groupby("model_version", sort=False):
        reference = version_reference(registry, config, model, version)
        for window in (w for w in windows(served, config.window) if len(w) >= config.min_rows):
            report = check_window(window, reference, config.thresholds, model=model,
                                  version=version, min_rows=config.min_rows)
            verdicts.append(verdict := confidence_verdict(report))
            if verdict["normed_alone_drifts"] != verdict["drifts"]:
                disagree.append({"version": version, "start": report.start,
                                 "normed_wasserstein": verdict["normed_wasserstein"],
                                 "energy": verdict["energy"]})
    return {"versions": int(log.model_version.nunique()), "windows": len(verdicts),
            "normed_alone": sum(v["normed_alone_drifts"] for v in verdicts),
            "both": sum(v["drifts"] for v in verdicts), "disagreements": disagree}


def logging_overhead(settings, registry, duration: float) -> dict:
    """Handle throughput at c=32 of both pipelines with the log off and on (ABBA order)."""
    import ray

    from serve_apps.config import ServeConfig
    from serve_apps.deploy import serve_config

    cfg = settings.serve.model_dump()
    cfg.update(use_gpu="no", chat={"enabled": False}, advisor={"enabled": False})
    serve_cfg = ServeConfig.model_validate(cfg)
    texts = sample_texts(11)
    cluster = start_ray(settings)
    runs: dict[str, list] = {"log_off": [], "log_on": []}
    try:
        for label in ("log_off", "log_on", "log_on", "log_off"):
            log = settings.log_settings() if label == "log_on" else None
            cluster.deploy(serve_config(serve_cfg, registry.tracking_uri, False,
                                        dict(runtime.PLATFORM_ENV), log), timeout_s=600)
            runs[label].append(asyncio.run(measure_handles([32], duration, texts)))
    finally:
        cluster.shutdown()
        ray.shutdown()
    out: dict = {}
    for name in PIPELINES:
        rps = {label: [r[name]["c32"]["rps"] for r in rs] for label, rs in runs.items()}
        off, on = np.mean(rps["log_off"]), np.mean(rps["log_on"])
        out[name] = {"rps_log_off": rps["log_off"], "rps_log_on": rps["log_on"],
                     "throughput_cost": round(1 - on / off, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="a data dir with a trained support-router champion")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from serve_apps.model import load

    settings, registry = platform(args.data_dir)
    model = load("models:/support-router@champion", registry.tracking_uri)

    if args.data_dir:  # what the monitor compares with: calibrated as served
        reference = registry.reference_profile("support-router", model.identity.version)
    else:
        held_out = generate("support-tickets", "base", 1000, seed=901)
        reference = reference_profile(model.model, model.tokenizer, held_out,
                                      model.meta["labels"], model.meta["max_length"])
    pool = features(model, "base", 4000, seed=902)
    shifted = features(model, "new-product", 500, seed=903, fraction=0.5)
    scenarios = {"new-product_10pct": features(model, "new-product", 500, seed=904, fraction=0.1),
                 "new-product_20pct": features(model, "new-product", 500, seed=905, fraction=0.2),
                 "new-product_50pct": shifted,
                 **{s: features(model, s, 500, seed=906 + i)
                    for i, s in enumerate(("label-shift", "slang", "concept-shift"))}}
    rng = np.random.default_rng(0)

    def window(n: int) -> pd.DataFrame:
        return pool.iloc[rng.integers(0, len(pool), n)].reset_index(drop=True)

    checks = {}
    for n in (1000, 5000, 20000):
        w = window(n)
        checks[f"{n}_rows"] = {"sampled_to_2000_s": round(timed_check(w, reference, 2000), 3)}
        if n <= 5000:  # every row: Evidently's MMD kernel grows with the square of the rows
            checks[f"{n}_rows"]["every_row_s"] = round(timed_check(w, reference, n), 3)
    report = {"benchmark": "drift", "cpus": os.cpu_count(), "reference_rows": len(reference),
              "models": "trained champion" if args.data_dir else "untrained architecture",
              "check_window": checks,
              "embedding_methods": embedding_methods(window(500), shifted, window(2000),
                                                     reference),
              "confidence_drift": confidence_rules(reference, [
                  pool.iloc[np.random.default_rng(i).choice(len(pool), 500, replace=False)]
                  for i in range(20)], scenarios),
              "confidence_drift_logged": logged_windows(settings, registry),
              "inference_log": logging_overhead(settings, registry, args.duration)}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
