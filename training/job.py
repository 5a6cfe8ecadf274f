"""One training job end to end: data -> distributed fine-tune -> holdout metrics -> registry.

`fit_and_register` takes any prepared `TaskData` (`training.taskdata`): the seeded generator's,
or reference data plus labelled traffic (the closed loop's retrain).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training import lineage, lora
from training.calibration import Calibration
from training.config import TaskConfig, TrainingConfig
from training.errors import InvalidData, UnknownName
from training.evaluate import evaluate_classifier, evaluate_lm, golden_set, measure
from training.features import generation_profile, reference_profile
from training.finetune import FinetuneSpec, run_finetune, run_names
from training.models import load_tokenizer, predict_proba, resolve_source
from training.prompts import PROMPT
from training.pyfunc import META_FILE, TaskModel, write_meta
from training.refs import RETRAIN_TAG, pin
from training.registry import RegisteredVersion, Registry, RunRecord
from training.retrain import calibration_rows
from training.taskdata import TaskData, validate_data


@dataclass
class JobResult:
    model: str
    version: int
    alias: str | None
    run_id: str
    model_uri: str
    metrics: dict[str, dict]
    history: list[dict]
    model_dir: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _targets(tc: TaskConfig, df: pd.DataFrame, labels: list[str]) -> list:
    if tc.kind == "classification":
        index = {lbl: i for i, lbl in enumerate(labels)}
        return [index[v] for v in df["label"]]
    return list(df["rewrite"])


def make_spec(config: TrainingConfig, registry: Registry, task: str, data: TaskData,
              after_epoch: Callable[[int, int], None] | None = None) -> FinetuneSpec:
    """Check the data and the model settings, and describe the fine-tune for the workers. A
    registered source is pinned to the version its alias names now: every worker, the adapter's
    lineage and a resumed run start from that one."""
    tc = config.task(task)
    labels = validate_data(tc, data)
    model = tc.model
    if model.source.startswith("models:/"):
        model = model.model_copy(update={"source": pin(model.source, registry.tracking_uri)[0]})
    # only a language model's source can be an adapter (LoRA adapts causal LMs alone)
    folder = resolve_source(model.source) if tc.kind == "causal-lm" else None
    if folder is not None and lora.is_adapter(folder):
        raise InvalidData(f"model.source {model.source} is a LoRA adapter, not a model: train "
                          f"on its base ({json.loads((folder / META_FILE).read_text())['base']})")
    if tc.method == "lora":
        lora.check(folder, tc.lora, model.source)
    corpus = [PROMPT.format(text=t) + " " + r for t, r in zip(data.train.text, data.train.rewrite)
              ] if tc.kind == "causal-lm" else []  # a scratch LM's tokenizer is trained on it
    tokenizer = load_tokenizer(model, tc.kind, corpus=corpus)
    return FinetuneSpec(
        kind=tc.kind, model=model, tokenizer=tokenizer, labels=labels,
        train_inputs=list(data.train.text), train_targets=_targets(tc, data.train, labels),
        val_inputs=list(data.validation.text), val_targets=_targets(tc, data.validation, labels),
        epochs=tc.epochs, batch_size=tc.batch_size, learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay, warmup_ratio=tc.warmup_ratio, deepspeed=config.deepspeed,
        seed=config.seed, tracking_uri=registry.tracking_uri, after_epoch=after_epoch,
        lora=tc.lora if tc.method == "lora" else None)


def run_name(task: str, kind: str = "finetune") -> str:
    return f"{task}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit_and_register(config: TrainingConfig, registry: Registry, task: str, data: TaskData, *,
                     storage_path: str, use_gpu: bool,
                     after_epoch: Callable[[int, int], None] | None = None,
                     tags: dict | None = None, resume: str | None = None) -> JobResult:
    """Fine-tune on `data`, evaluate every holdout and register a new version of `task`.

    `resume` names an earlier run under `storage_path`: Ray Train restores its checkpoints and
    training continues after the last finished epoch (for a command that was killed)."""
    started = time.perf_counter()
    if resume and resume not in run_names(storage_path, ""):
        raise UnknownName("run to resume", resume, run_names(storage_path, f"{task}-finetune-"))
    registry.check()
    spec = make_spec(config, registry, task, data, after_epoch)
    name = resume or run_name(task)
    print(f"run {name}: checkpoints in {storage_path}/{name} (continue it with --resume {name})",
          file=sys.stderr, flush=True)
    return finetune_and_register(config, registry, task, data, spec, name, started,
                                 storage_path=storage_path, use_gpu=use_gpu, tags=tags)


def finetune_and_register(config: TrainingConfig, registry: Registry, task: str, data: TaskData,
                          spec: FinetuneSpec, name: str, started: float, *, storage_path: str,
                          use_gpu: bool, tags: dict | None = None, **register) -> JobResult:
    """Run `spec` on Ray Train as run `name`, consolidate, evaluate and register it (`register`:
    more of `register_model_dir`'s options), inside the run's lineage."""
    with recorded(config, registry, task, data, name, tags) as run:
        with run_finetune(spec, name=name, storage_path=storage_path, workers=config.workers,
                          use_gpu=use_gpu, resources=config.worker_resources(use_gpu),
                          max_failures=config.max_failures) as result:
            if data.scenario == "retrain":
                register["extra_params"] = {**register.get("extra_params", {}),
                                            "champion_weight": _keep_champion(
                                                config, data, spec, result.model_dir)}
            job = register_model_dir(config, registry, task, data, result.model_dir, spec.labels,
                                     history=result.history, ds_config=result.ds_config,
                                     started=started, tags=tags, **register)
        run.outputs.append(lineage.model_version(registry.tracking_uri, task, job.version))
    return job


def _keep_champion(config: TrainingConfig, data: TaskData, spec: FinetuneSpec,
                   model_dir: Path) -> float:
    """A retrained classifier's model folder moved back towards the champion it started from
    by the share `champion_share` allows, where that costs no validation row
    (`training/interpolation.py`); that share."""
    from training import interpolation

    champion = None if spec.lora is not None or spec.kind != "classification" \
        else resolve_source(spec.model.source)
    share = interpolation.champion_share(config.retrain.champion_weight, data.notes, model_dir,
                                         champion, spec.labels)
    if not share:
        return 0.0
    from transformers import AutoModelForSequenceClassification

    model, truth = AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), \
        np.array(spec.val_targets)

    def errors(weights: dict) -> int:
        model.load_state_dict(weights, strict=False)  # non-persistent buffers are not saved
        return int((predict_proba(model, spec.tokenizer, spec.val_inputs, spec.model.max_length
                                  ).argmax(axis=1) != truth).sum())

    return interpolation.keep(model_dir, champion, share, errors)


@contextmanager
def recorded(config: TrainingConfig, registry: Registry, task: str, data: TaskData, name: str,
             tags: dict | None = None) -> Iterator[lineage.Run]:
    """The OpenLineage run of the fine-tune `name`: its data's sources and a registered base
    in, a retrain's run as its parent (`RETRAIN_TAG`); add the version it registers to the
    run's outputs."""
    retrain = (tags or {}).get(RETRAIN_TAG)
    source = config.task(task).model.source
    base = [lineage.Dataset(registry.tracking_uri, pin(source, registry.tracking_uri)[0],
                            description="base model")] if source.startswith("models:/") else []
    with registry.lineage.run(lineage.job(lineage.TRAIN, task), [*data.sources, *base],
                              parent=lineage.retrain_run(task, retrain) if retrain else None,
                              description=f"fine-tune {task} ({name})") as run:
        yield run


def _held_out(data: TaskData) -> pd.DataFrame:
    """Rows of the training distribution the version was not fit on: its drift reference."""
    return pd.concat([data.validation, data.holdouts.get(data.scenario, data.validation[:0])])


def _calibrate(task_model: TaskModel, model_dir: Path, tc: TaskConfig, data: TaskData,
               labels: list[str], recent_share: float) -> tuple[dict, pd.DataFrame]:
    """A classifier calibrated on rows never trained on (a retrain's weighted towards the
    traffic since the drift), before anything is measured: its holdout metrics and its drift
    reference (held-out rows, and the traffic a retrain serves)."""
    model, tokenizer, max_length = task_model.model, task_model.tokenizer, tc.model.max_length
    rows, weights = calibration_rows(data, recent_share)
    calibration = Calibration.fit(predict_proba(model, tokenizer, list(rows.text), max_length),
                                  np.array(_targets(tc, rows, labels)), tc.label_noise, weights)
    task_model.meta = {**task_model.meta, **calibration.to_meta()}
    write_meta(model_dir, task_model.meta)
    metrics = evaluate_classifier(model, tokenizer, data.holdouts, labels, max_length,
                                  calibration.temperature)
    metrics["calibration"] = {"temperature": calibration.temperature,
                              "rows": len(calibration.scores)}
    held_out = _held_out(data)
    profile = pd.concat([reference_profile(model, tokenizer, df, labels, max_length,
                                           temperature=calibration.temperature, served=served)
                         for df, served in ((held_out, False), (data.served, True))
                         if df is not None and len(df)], ignore_index=True)
    return metrics, profile


def register_model_dir(config: TrainingConfig, registry: Registry, task: str, data: TaskData,
                       model_dir: Path, labels: list[str], *, history: list[dict], ds_config: dict,
                       started: float, tags: dict | None = None,
                       extra_params: dict | None = None, aliased: bool = True) -> JobResult:
    """Evaluate a consolidated model folder (or adapter folder) on the holdouts and register
    it; an adapter's version is tagged with its exact base (`llmops.base`, and
    `llmops.base_sha256` for a folder or hub base)."""
    tc = config.task(task)
    base = {}
    if lora.is_adapter(model_dir):
        source = lora.adapter_config(model_dir)["base_model_name_or_path"]
        base = lora.lineage(source, resolve_source(source))
    meta = {"kind": tc.kind, "labels": labels, "max_length": tc.model.max_length, "task": task,
            **base}
    write_meta(model_dir, meta)
    task_model = TaskModel.from_folder(model_dir)
    model, tokenizer = task_model.model, task_model.tokenizer
    if tc.kind == "classification":
        metrics, profile = _calibrate(task_model, model_dir, tc, data, labels,
                                      config.retrain.recent_calibration_share)
    else:
        metrics = evaluate_lm(model, tokenizer, data.holdouts, tc.model.max_length)
        profile = generation_profile(task_model, _held_out(data))
    golden = golden_set(tc) if data.golden is None else data.golden  # a retrain keeps its own
    metrics["golden"] = measure(lambda df: task_model.predict(None, df), golden, tc.kind)
    if data.notes.get("concept_shift"):
        tags = {**(tags or {}), "llmops.concept_shift": data.notes["concept_shift"][:5000]}
    adapter = {f"lora_{k}": v for k, v in tc.lora.model_dump().items()} if base else {}
    params = {**{k: v for k, v in tc.model_dump().items() if k not in ("model", "holdouts", "lora")},
              **adapter,
              "model_source": tc.model.source, "max_length": tc.model.max_length,
              "workers": config.workers, "deepspeed_stage": config.deepspeed.stage,
              "seed": config.seed, "scenario": data.scenario, **(extra_params or {})}
    record = RunRecord(
        task=task, model_dir=model_dir, params=params, history=history, holdout_metrics=metrics,
        ds_config=ds_config,
        datasets={f"{tc.dataset}:{data.scenario}": data.train,
                  **{f"{tc.dataset}-holdout:{h}": df for h, df in data.holdouts.items()},
                  f"{tc.dataset}-golden:{'base' if data.golden is None else data.scenario}":
                      golden},
        input_example=pd.DataFrame({"text": list(data.train.text[:2])}),
        tags={**(tags or {}), **{f"llmops.{k}": v for k, v in base.items()}},
        profile=profile, golden=golden, aliased=aliased)
    version: RegisteredVersion = registry.record(record)
    return JobResult(model=version.name, version=version.version, alias=version.alias,
                     run_id=version.run_id, model_uri=version.model_uri, metrics=metrics,
                     history=history, model_dir=str(model_dir),
                     seconds=round(time.perf_counter() - started, 1))
