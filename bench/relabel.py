"""How right a concept-shift retrain's relabelled replay is, and what its errors cost the retrain,
measured apart from the loop: minutes, where `bench/loop.py` takes half an hour.

    python bench/relabel.py --json --data-dir .llmops [--version 1] [--labels 240] [--seed 5]

`--labels` concept-shifted support tickets, labelled, are the feedback; the retraining set is
what the loop's retrain builds from them and the champion's replay (`training/retrain.py`,
70% of them learnt from), three ways: the replay as it is (no contradiction check), relabelled
by `training/contradiction.py` (the loop's setting), and relabelled by the generator's own
truth (the ceiling of any relabelling). Each set fine-tunes the router's `--version` in this
process as a retrain does (its task's epochs, learning rate, batch size and warm-up; plain
PyTorch, not DeepSpeed: one process is enough for the comparison), scored by macro-F1 on 600
other concept-shifted tickets. Per way: the share of replay rows whose label is the new
concept's, and the macro-F1 against the version's own and against the clean macro-F1 it was
registered with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.settings import load_settings  # noqa: E402
from training.registry import GOLDEN_FILE, REFERENCE_FILE, Registry  # noqa: E402

MODEL, DATASET, SCENARIO = "support-router", "support-tickets", "concept-shift"


def loaded(folder: str, task, labels: list[str]):
    """The version in `folder` as a fine-tune starts from it (embeddings frozen where the task
    says so), and its tokenizer."""
    from transformers import AutoTokenizer

    from training.models import build_model

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return build_model(task.model.model_copy(update={"source": folder}), task.kind, labels,
                       tokenizer), tokenizer


def fine_tuned(folder: str, task, train, labels: list[str], seed: int):
    """The version in `folder` fine-tuned on `train` as a retrain would fine-tune it."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from training.models import collate, encode_classification

    torch.manual_seed(seed)
    model, tokenizer = loaded(folder, task, labels)
    index = {label: i for i, label in enumerate(labels)}
    rows = encode_classification(tokenizer, list(train.text), [index[x] for x in train.label],
                                 task.model.max_length)
    steps = task.epochs * -(-len(rows) // task.batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=task.learning_rate, weight_decay=task.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(task.warmup_ratio * steps), steps)
    model.train()
    for epoch in range(task.epochs):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(rows), task.batch_size):
            batch = [rows[j] for j in order[i:i + task.batch_size].tolist()]
            model(**collate(batch, tokenizer.pad_token_id)).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return model.eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="1", help="the router version retrained")
    parser.add_argument("--labels", type=int, default=240, help="labelled shifted tickets")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--config", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report_to, sys.stdout = sys.stdout, sys.stderr  # what libraries print: not the report

    import mlflow
    import numpy as np
    from sklearn.metrics import f1_score

    from training.data import DATASETS, generate
    from training.models import classify
    from training.registry import download_hf_model
    from training.retrain import retraining_data

    settings = load_settings(args.config, overrides={"data_dir": args.data_dir}
                             if args.data_dir else None)
    registry = Registry(settings.registry, settings.data_dir)
    mlflow.set_tracking_uri(registry.tracking_uri)
    task, retrain = settings.training.tasks[MODEL], settings.training.retrain
    folder = str(download_hf_model(f"models:/{MODEL}/{args.version}"))
    labels = registry.labels(MODEL, args.version)
    reference = registry.run_data(MODEL, args.version, REFERENCE_FILE)
    golden = registry.run_data(MODEL, args.version, GOLDEN_FILE)
    moved = DATASETS[DATASET].concept_relabel
    truth = reference.assign(label=[moved.get(i, y) for i, y in zip(reference.intent,
                                                                    reference.label)])
    recent = generate(DATASET, SCENARIO, args.labels, seed=args.seed)[["text", "label"]]
    test = generate(DATASET, SCENARIO, 600, seed=args.seed + 1000)

    def score(model, tokenizer) -> float:
        probs = classify(model, tokenizer, list(test.text), task.model.max_length).probs
        return round(float(f1_score(test.label, [labels[i] for i in probs.argmax(1)],
                                    average="macro")), 4)

    ways = {"as_is": (reference, False), "contradiction": (reference, True),
            "truth": (truth, False)}
    clean = registry.run_metrics(MODEL, args.version)["base_macro_f1"]
    result = {"model": MODEL, "version": args.version, "labels": args.labels,
              "clean_macro_f1": round(clean, 4),
              "version_on_shifted": score(*loaded(folder, task, labels)), "ways": {}}
    sample = reference.sample(n=min(retrain.replay_rows, len(reference)),
                              random_state=settings.training.seed)  # the replay's rows
    right = dict(zip(sample.text, truth.loc[sample.index, "label"]))
    for way, (replay, resolve) in ways.items():
        data = retraining_data(recent, replay, golden, retrain.model_copy(
            update={"resolve_contradictions": resolve}), settings.training.seed)
        replayed = data.train[data.train.text.isin(right)]  # by text: the replay's rows
        f1 = score(*fine_tuned(folder, task, data.train, labels, args.seed))
        result["ways"][way] = {
            "replay_rows_right": round(float(np.mean(replayed.label == replayed.text.map(right))),
                                       4),
            "train_rows": len(data.train), "macro_f1": f1,
            "of_clean": round(f1 / clean, 3),
            "moves": data.notes.get("concept_shift", "")}
        print(f"{way}: {result['ways'][way]}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=None if args.json else 2), file=report_to)


if __name__ == "__main__":
    main()
