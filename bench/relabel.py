"""How right a concept-shift retrain's relabelled replay is, and what its errors cost the retrain,
measured apart from the loop: minutes, where `bench/loop.py` takes half an hour.

    python bench/relabel.py --json --data-dir .llmops [--version 1] [--labels 240] [--seed 5]
                            [--asked random|queue] [--ways contradiction_teacher ...]

`--labels` concept-shifted support tickets, labelled, are the feedback: drawn at random, or
as the platform's label queue asks for them in the loop (`queue`, `asked_by_queue`: batches
of 250 answered by the version and logged as its replica logs them, 25 of each labelled from
`monitoring.feedback.pending`). The retraining set is what the loop's retrain builds from
them, each with the version's answer as the loop logs it (its holdout keeps the labels that
alone contradict an answer learnt), and the champion's replay (`training/retrain.py`, 70% of
them learnt from), four ways
(`--ways`: all by default): the replay as it is (no contradiction check), relabelled by
`training/contradiction.py` alone, relabelled by it with the teacher's second opinion
(`training/teacher.py`: the loop's setting), and relabelled by the generator's own truth (the
ceiling of any relabelling). Each set fine-tunes the router's `--version` in this process as a
retrain does (`training/worker.fit_in_process`: its task's epochs, learning rate, batch size,
warm-up and clipping; no Ray or DeepSpeed: one process is enough for the comparison), scored
by macro-F1 on 600 other concept-shifted tickets. Per way: the share of replay rows whose label
is the new concept's, and the macro-F1 against the version's own and against the clean
macro-F1 it was registered with.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import report  # noqa: E402

from training.registry import GOLDEN_FILE, REFERENCE_FILE, Registry  # noqa: E402

MODEL, DATASET, SCENARIO = "support-router", "support-tickets", "concept-shift"
BATCH, LABELLED = 250, 25  # the loop's drifted batches (`cluster/demo.py`), a tenth labelled
WAYS = ("as_is", "contradiction", "contradiction_teacher", "truth")


def retrained(settings, registry, folder: str, data):
    """The version in `folder` fine-tuned on `data` as the loop's retrain fine-tunes it (its
    `job_settings`: the task starts from the version), in this process."""
    from training.job import make_spec
    from training.worker import fit_in_process

    spec = make_spec(settings.training.starting_from(MODEL, folder), registry, MODEL, data)
    return fit_in_process(spec), spec.tokenizer


def scorer(settings, labels: list[str], seed: int):
    """Macro-F1 of a model on 600 concept-shifted tickets the retraining never saw."""
    from sklearn.metrics import f1_score

    from training.data import generate
    from training.models import classify

    test = generate(DATASET, SCENARIO, 600, seed=seed + 1000)
    max_length = settings.training.tasks[MODEL].model.max_length

    def score(model, tokenizer) -> float:
        probs = classify(model, tokenizer, list(test.text), max_length).probs
        return round(float(f1_score(test.label, [labels[i] for i in probs.argmax(1)],
                                    average="macro")), 4)
    return score


def asked_by_queue(settings, registry, model, n: int, seed: int, folder: Path):
    """`n` labelled shifted tickets as the platform's label queue asks for them in the loop:
    batches of `BATCH`, answered by `model` (the version loaded as its replica loads it,
    `serve_apps.model`), written to an inference log in `folder` as the serving path writes
    them (`serve_apps.inference_log`), and `LABELLED` of each batch labelled, the queue's first
    (`monitoring.feedback.pending` since the batch, with what earlier batches' labels point
    it to), as `llmops traffic --feedback` labels them; the clean traffic before the drift,
    unlabelled, first."""
    import asyncio

    import pandas as pd

    from monitoring.config import LogConfig
    from monitoring.feedback import Label, feedback_rows, pending
    from monitoring.log import FEEDBACK, SegmentWriter, now
    from serve_apps.inference_log import InferenceLog
    from training.data import generate

    log = {"uri": str(folder), **LogConfig(compact_interval_s=None).model_dump(exclude={"uri"})}
    who = {"name": MODEL, "version": model.identity.version, "variant": "champion"}
    labels_of = functools.cache(registry.labels)

    async def answer(rows: pd.DataFrame, batch: int) -> dict[str, str]:
        writer, ids = InferenceLog("support", log), [f"b{batch}-{i}" for i in range(len(rows))]
        for rid, text, out in zip(ids, rows.text, model.classify(list(rows.text))):
            await writer.record(rid, [text], [{**out, "model": who}], [{"router": who}],
                                time.perf_counter())
        await writer.close()
        return dict(zip(ids, rows.label))

    asyncio.run(answer(generate(DATASET, "base", 300, seed=seed), -1))
    labels, batch, config = [], 0, settings.serve.feedback.queue
    while len(labels) < n:
        since = now()
        truth = asyncio.run(answer(generate(DATASET, SCENARIO, BATCH, seed=seed * 1000 + batch),
                                   batch))
        page = pending(str(folder), "default", min(LABELLED, n - len(labels)), config,
                       model=MODEL, since=since)
        asked = [Label(it["request_id"], 0, truth[it["request_id"]], "default") for it in page]
        SegmentWriter(str(folder), FEEDBACK, LogConfig()).write_segment([  # as the feedback app
            {**row, "ts": now()} for row in feedback_rows(str(folder), labels_of, asked)])
        labels += [(it["text"], lab.label) for it, lab in zip(page, asked)]
        batch += 1
    return pd.DataFrame(labels, columns=["text", "label"])


def measure(settings, version: str, n_labels: int, seed: int, asked: str,
            ways: list[str]) -> dict:
    """The `ways`' retrains of `version` from `n_labels` labelled shifted tickets."""
    import mlflow
    import numpy as np

    from serve_apps.model import load
    from training import teacher
    from training.data import DATASETS, generate
    from training.refs import reference as reference_of
    from training.registry import download_hf_model
    from training.retrain import retraining_data

    registry = Registry(settings.registry, settings.data_dir)
    mlflow.set_tracking_uri(registry.tracking_uri)
    retrain = settings.training.retrain
    folder = str(download_hf_model(reference_of(MODEL, version)))
    score = scorer(settings, registry.labels(MODEL, version), seed)
    reference = registry.run_data(MODEL, version, REFERENCE_FILE)
    golden = registry.run_data(MODEL, version, GOLDEN_FILE)
    moved = DATASETS[DATASET].concept_relabel
    truth = reference.assign(label=[moved.get(i, y) for i, y in zip(reference.intent,
                                                                    reference.label)])
    right = dict(zip(truth.text, truth.label))  # each replay row's label in the new concept
    loaded = load(reference_of(MODEL, version), registry.tracking_uri)
    served = (loaded.model, loaded.tokenizer)
    if asked == "queue":
        with tempfile.TemporaryDirectory(prefix="relabel-log-") as log:
            recent = asked_by_queue(settings, registry, loaded, n_labels, seed, Path(log))
    else:
        recent = generate(DATASET, SCENARIO, n_labels, seed=seed)[["text", "label"]]
    recent = recent.assign(prediction=[out["label"] for out in loaded.classify(list(recent.text))])
    clean = registry.run_metrics(MODEL, version)["base_macro_f1"]
    result = {"model": MODEL, "version": version, "labels": n_labels, "asked": asked,
              "labelled": recent.label.value_counts().to_dict(),
              "clean_macro_f1": round(clean, 4), "ways": {},
              "version_on_shifted": score(*served)}
    teach = functools.partial(teacher.fit, settings.training, registry, MODEL,
                              reference_of(MODEL, version))
    for way, replay, resolve, judge in [
            ("as_is", reference, False, None), ("contradiction", reference, True, None),
            ("contradiction_teacher", reference, True, teach), ("truth", truth, False, None)]:
        if way not in ways:
            continue
        data = retraining_data(recent, replay, golden, retrain.model_copy(
            update={"resolve_contradictions": resolve}), settings.training.seed, judge)
        replayed = data.train.dropna(subset=["intent"])  # recent rows have no provenance
        f1 = score(*retrained(settings, registry, folder, data))
        result["ways"][way] = {
            "replay_rows_right": round(float(np.mean(
                replayed.label == replayed.text.map(right))), 4),
            "train_rows": len(data.train), "macro_f1": f1, "of_clean": round(f1 / clean, 3),
            "moves": data.notes.get("concept_shift", ""),
            "teacher_relabelled": data.notes.get("teacher_relabelled")}
        print(f"{way}: {result['ways'][way]}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="1", help="the router version retrained")
    parser.add_argument("--labels", type=int, default=240, help="labelled shifted tickets")
    parser.add_argument("--asked", choices=("random", "queue"), default="random",
                        help="which tickets get the labels")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    report(parser, lambda settings, args: measure(settings, args.version, args.labels,
                                                  args.seed, args.asked, args.ways))


if __name__ == "__main__":
    main()
