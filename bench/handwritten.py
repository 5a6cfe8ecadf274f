"""How the support router and the concept-shift check carry over from generated tickets to
tickets a person wrote (`training/data/handwritten/`), in one run and on the same version.

    python bench/handwritten.py --json --data-dir .llmops [--version 1]

Routing: the version on the 115 hand-written tickets and on as many generated ones of the same
intents (the baseline): accuracy and macro-F1 against the true labels, expected calibration
error, and with the served conformal error rate (`serve.support.classifier.error_rate`) the
share answered (a one-label set), their precision and the median confidence of the mistakes;
each with its ratio to the baseline. Concept shift: the hand-written tickets as feedback on the
version's own training rows (`training/contradiction.py`), labelled as before (nothing moved)
and as the concept-shift scenario relabels them: the moves found, and how many replay rows were
relabelled, rightly, and retired.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack import report  # noqa: E402

from training.registry import CHAMPION, REFERENCE_FILE, Registry  # noqa: E402

MODEL, DATASET = "support-router", "support-tickets"


def routing(model, df, error_rate: float) -> dict:
    """The version's answers on `df` scored against its `label` column."""
    from sklearn.metrics import f1_score

    from training.calibration import Calibration, prediction_set
    from training.evaluate import expected_calibration_error

    out = model.predict(None, df[["text"]])
    probs = out[[f"prob_{label}" for label in model.meta["labels"]]].to_numpy()
    q = Calibration.of(model.meta).threshold(error_rate)
    answered = np.array([len(prediction_set(p, q)) == 1 for p in probs])
    right, conf = out.label.to_numpy() == df.label.to_numpy(), out.confidence.to_numpy()
    ece = expected_calibration_error(probs, df.label.map(model.meta["labels"].index).to_numpy())
    return {"texts": len(df), "accuracy": round(float(right.mean()), 4),
            "macro_f1": round(float(f1_score(df.label, out.label, average="macro")), 4),
            "ece": round(float(ece), 4), "answered": round(float(answered.mean()), 4),
            "precision_answered": round(float(right[answered].mean()), 4),
            "median_confidence_wrong": round(float(np.median(conf[~right])), 4)
            if (~right).any() else None}


def contradictions(people, replay) -> dict:
    """The concept-shift check with `people`'s labels as the feedback on `replay`."""
    from training.contradiction import resolve
    from training.data import true_labels

    kept, report = resolve(people[["text", "label"]], {"replay": replay[["text", "label"]]},
                           relabel=["replay"])
    rows = kept["replay"]
    changed = rows.label.to_numpy() != replay.label.loc[rows.index].to_numpy()
    truth = true_labels(DATASET, replay.loc[rows.index].assign(
        scenario=people.scenario.iloc[0])).to_numpy()
    return {"moved": report.moved, "suspected": report.suspected,
            "replay_relabelled": int(changed.sum()),
            "relabelled_rightly": int((rows.label.to_numpy()[changed] == truth[changed]).sum()),
            "replay_retired": len(replay) - len(rows)}


def measure(settings, version: str | None) -> dict:
    import mlflow

    from training.data import generate, handwritten, true_labels
    from training.pyfunc import TaskModel
    from training.refs import reference
    from training.registry import download_hf_model

    registry = Registry(settings.registry, settings.data_dir)
    mlflow.set_tracking_uri(registry.tracking_uri)
    version = version or str(registry.alias_version(MODEL, CHAMPION))
    model = TaskModel.from_folder(download_hf_model(reference(MODEL, version)))
    people = handwritten(DATASET)
    generated = generate(DATASET, "base", 40 * len(people), seed=11)
    generated = (generated[generated.intent.isin(people.intent)]
                 .groupby("intent").head(people.intent.value_counts().max()))
    generated = generated.assign(label=true_labels(DATASET, generated))
    error_rate = settings.serve.support.classifier.error_rate
    by_people, by_generator = routing(model, people, error_rate), routing(model, generated,
                                                                           error_rate)
    replay = registry.run_data(MODEL, version, REFERENCE_FILE)
    replay = replay[replay.scenario == "base"]
    return {"model": MODEL, "version": version, "error_rate": error_rate,
            "routing": {"handwritten": by_people, "generated": by_generator,
                        "ratio": {k: round(v / by_generator[k], 3)
                                  for k, v in by_people.items()
                                  if k != "texts" and v and by_generator.get(k)}},
            "concept_shift_feedback": {
                scenario: contradictions(handwritten(DATASET, scenario), replay)
                for scenario in ("base", "concept-shift")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=None, help="default: the champion")
    report(parser, lambda settings, args: measure(settings, args.version))


if __name__ == "__main__":
    main()
