"""Distillation: the peak fallback of a model, a smaller student trained on its champion's
outputs (`llmops distill TASK`).

The student is the task's model with fewer layers (`distill.layers`; a pretrained source keeps
its first ones, 2 of MiniLM's 6). It trains with DeepSpeed on Ray Train like any fine-tune, on
the rows the champion was trained on. A classifier's student learns the champion's
probabilities at `distill.temperature` weighed `distill.alpha` against the true labels (Hinton
et al.'s loss, `training/worker.py`); a generator's learns the champion's own greedy answers to
those prompts instead of the references (sequence-level distillation, Kim and Rush 2016: the
teacher's answers are what the student can match, and what it stands in for at a peak). It is
registered as a version of the same model, tagged with the champion it learned from, and
aliased `fallback` only if the fallback gate passes: on the base holdout and on the champion's
golden set, its gate metric (a generator's: token F1) is at most `distill.margin` below the
champion's (`training/retrain.py`, `fallback_gate`). The drift scenarios' holdouts are measured
and registered too, not gated: a model a third the size generalises less far.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace

from training.config import ModelSpec, TrainingConfig
from training.errors import InvalidData
from training.job import JobResult, finetune_and_register, make_spec, run_name
from training.registry import CHAMPION, FALLBACK, GOLDEN_FILE, REFERENCE_FILE, Registry
from training.retrain import GateResult, fallback_gate, gate_metric
from training.taskdata import TaskData, build_task_data

DISTILLED_FROM_TAG = "llmops.distilled_from"  # the champion version a student learned from
GATE_TAG = "llmops.fallback_gate"
# the architecture keys that count layers, one per model family; the student sets its own
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class DistillResult:
    job: JobResult
    teacher: int
    gate: GateResult

    def to_dict(self) -> dict:
        return {**self.job.to_dict(), "teacher": self.teacher, "gate": asdict(self.gate)}


def student_model(model: ModelSpec, layers: int) -> ModelSpec:
    """The task's model spec with `layers` layers (a pretrained source keeps its first ones)."""
    architecture = {k: v for k, v in model.architecture.items() if k not in _LAYER_KEYS}
    return model.model_copy(update={"architecture": {**architecture,
                                                     "num_hidden_layers": layers}})


def student_config(config: TrainingConfig, task: str) -> TrainingConfig:
    """The training settings of the student: the task's, with the student's model, epochs and
    learning rate."""
    tc = config.task(task)
    d = tc.distill
    student = tc.model_copy(update={
        "model": student_model(tc.model, d.layers), "epochs": d.epochs,
        "learning_rate": d.learning_rate})
    return config.model_copy(update={"tasks": {**config.tasks, task: student}})


def student_data(config: TrainingConfig, registry: Registry, task: str, version: int) -> TaskData:
    """The champion's own training rows (a retrained champion's: its retraining mix), a tenth
    kept for validation; the task's seeded holdouts; the champion's golden set."""
    target = "label" if config.task(task).kind == "classification" else "rewrite"
    reference = registry.run_data(task, str(version), REFERENCE_FILE)[["text", target]]
    rows = reference.sample(frac=1.0, random_state=config.seed).reset_index(drop=True)
    n_val = max(16, min(200, len(rows) // 10))
    seeded = build_task_data(config, task)
    return TaskData(train=rows.iloc[n_val:].reset_index(drop=True),
                    validation=rows.iloc[:n_val].reset_index(drop=True),
                    holdouts=seeded.holdouts, scenario="distill",
                    sources=seeded.sources[1:],  # the holdouts'; the rows are the champion's
                    golden=registry.run_data(task, str(version), GOLDEN_FILE))


def distill_and_register(config: TrainingConfig, registry: Registry, task: str, *,
                         storage_path: str, use_gpu: bool) -> DistillResult:
    """Train the champion's student, register it, and alias it `fallback` if its gate passes."""
    from training.evaluate import score

    started = time.perf_counter()
    tc = config.task(task)
    if tc.method == "lora":
        raise InvalidData(f"task {task} trains LoRA adapters: its student would be a whole "
                          f"smaller model, not an adapter of its base; distil the base's task")
    registry.check()
    teacher = registry.alias_version(task, CHAMPION)
    if teacher is None:
        raise InvalidData(f"{task} has no champion to distil: train it first (llmops train "
                          f"{task})")
    data = student_data(config, registry, task, teacher)
    champion = registry.load_model(task, str(teacher))
    d, student = tc.distill, student_config(config, task)
    if tc.kind == "classification":
        from training.models import predict_proba

        soft = predict_proba(champion.model, champion.tokenizer, list(data.train.text),
                             tc.model.max_length, temperature=d.temperature)
        spec = make_spec(student, registry, task, data)
        spec.soft_targets, spec.distill_temperature, spec.distill_alpha = \
            soft.tolist(), d.temperature, d.alpha
    else:
        data = _answered_by(champion, data)
        spec = make_spec(student, registry, task, data)
    name = run_name(task, "distill")
    print(f"run {name}: a {d.layers}-layer student of {task} v{teacher}", file=sys.stderr,
          flush=True)
    job = finetune_and_register(
        student, registry, task, data, spec, name, started, storage_path=storage_path,
        use_gpu=use_gpu, tags={DISTILLED_FROM_TAG: str(teacher)}, aliased=False, extra_params={
            "distilled_from": teacher, "student_layers": d.layers,
            "distill_temperature": d.temperature, "distill_alpha": d.alpha})
    learned = registry.load_model(task, str(job.version))
    # judged where the champion is: its training distribution and its golden set (the drift
    # scenarios' holdouts are in the version's metrics: a smaller model generalises less)
    holdouts = {"base": data.holdouts["base"], "golden": data.golden} \
        if "base" in data.holdouts else {"golden": data.golden}
    metric = gate_metric(tc.kind, config.gate)
    gate = fallback_gate({h: score(champion, df, metric) for h, df in holdouts.items()},
                         {h: score(learned, df, metric) for h, df in holdouts.items()},
                         metric, d.margin)
    registry.tag_version(task, job.version, {GATE_TAG: gate.reason[:5000]})
    if gate.promote:
        registry.set_alias(task, FALLBACK, job.version)
        job.alias = FALLBACK
    return DistillResult(job, teacher, gate)



def _answered_by(champion, data: TaskData) -> TaskData:
    """`data` with the champion's greedy answers as the training and validation targets."""
    def answered(rows):
        return rows.assign(rewrite=list(champion.predict(None, rows[["text"]])["text"]))

    return replace(data, train=answered(data.train), validation=answered(data.validation))
