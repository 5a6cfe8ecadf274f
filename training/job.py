"""One training job end to end: data -> distributed fine-tune -> holdout metrics -> registry.

`build_task_data` makes the data with the seeded generator; `fit_and_register` takes any
prepared `TaskData` (the closed loop will pass reference data plus labelled traffic).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from training import data as datagen
from training.config import TaskConfig, TrainingConfig
from training.errors import InvalidData, UnknownName
from training.evaluate import evaluate_classifier, evaluate_lm
from training.features import reference_profile
from training.finetune import Chaos, FinetuneSpec, run_finetune, run_names
from training.golden import golden_set, measure
from training.models import PROMPT, load_tokenizer
from training.pyfunc import TaskModel, write_meta
from training.registry import RegisteredVersion, Registry, RunRecord


@dataclass
class TaskData:
    """Training rows, a small validation split (for early stopping) and named holdouts."""

    train: pd.DataFrame
    validation: pd.DataFrame
    holdouts: dict[str, pd.DataFrame]
    scenario: str = "base"

    def save(self, folder: Path) -> Path:
        """As Parquet files (what a retrain job reads back with `load`)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, df in {"train": self.train, "validation": self.validation,
                         **{f"holdout-{h}": df for h, df in self.holdouts.items()}}.items():
            df.to_parquet(folder / f"{name}.parquet", index=False)
        (folder / "scenario").write_text(self.scenario)
        return folder

    @classmethod
    def load(cls, folder: Path) -> TaskData:
        folder = Path(folder)
        if not (folder / "train.parquet").is_file():
            raise InvalidData(f"{folder} holds no train.parquet (see TaskData.save)")
        return cls(train=pd.read_parquet(folder / "train.parquet"),
                   validation=pd.read_parquet(folder / "validation.parquet"),
                   holdouts={p.stem.removeprefix("holdout-"): pd.read_parquet(p)
                             for p in sorted(folder.glob("holdout-*.parquet"))},
                   scenario=(folder / "scenario").read_text().strip())


@dataclass
class JobResult:
    model: str
    version: int
    alias: str
    run_id: str
    model_uri: str
    metrics: dict[str, dict]
    history: list[dict]
    model_dir: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def task_config(config: TrainingConfig, task: str) -> TaskConfig:
    if task not in config.tasks:
        raise UnknownName("task", task, list(config.tasks))
    return config.tasks[task]


def build_task_data(config: TrainingConfig, task: str, scenario: str = "base") -> TaskData:
    """Seeded training data for `task` under `scenario`, and every configured holdout."""
    tc = task_config(config, task)

    def make(name: str, n: int, seed: int) -> pd.DataFrame:
        return datagen.generate(tc.dataset, name, n, seed, priors=tc.label_priors)

    seed = config.seed
    return TaskData(
        train=make(scenario, tc.train_size, seed),
        validation=make(scenario, min(tc.holdout_size, 200), seed + 101),
        holdouts={h: make(h, tc.holdout_size, seed + 1000 + i) for i, h in enumerate(tc.holdouts)},
        scenario=scenario)


def validate_data(tc: TaskConfig, data: TaskData) -> list[str]:
    """The label list, after checking the data can train this task; raises InvalidData."""
    labels = datagen.labels_of(tc.dataset)
    if data.train.empty:
        raise InvalidData("the training dataset is empty")
    for name, df in {"training": data.train, **data.holdouts}.items():
        if missing := {"text", "label"} - set(df.columns):
            raise InvalidData(f"the {name} dataset lacks columns {sorted(missing)}")
        if unknown := set(df["label"]) - set(labels):
            raise InvalidData(f"the {name} dataset has labels outside {labels}: {sorted(unknown)}")
    if tc.kind == "classification":
        if absent := [lbl for lbl in labels if lbl not in set(data.train["label"])]:
            raise InvalidData(f"label(s) {absent} never occur in the training data; every one of "
                              f"{labels} needs examples")
    elif (data.train["rewrite"].fillna("") == "").any():
        raise InvalidData("causal-lm training rows need a non-empty 'rewrite'")
    return labels


def _targets(tc: TaskConfig, df: pd.DataFrame, labels: list[str]) -> list:
    if tc.kind == "classification":
        index = {lbl: i for i, lbl in enumerate(labels)}
        return [index[v] for v in df["label"]]
    return list(df["rewrite"])


def make_spec(config: TrainingConfig, registry: Registry, task: str, data: TaskData,
              chaos: Chaos | None = None) -> FinetuneSpec:
    """Check the data and describe the fine-tune for the workers."""
    tc = task_config(config, task)
    labels = validate_data(tc, data)
    corpus = [PROMPT.format(text=t) + " " + r for t, r in zip(data.train.text, data.train.rewrite)
              ] if tc.kind == "causal-lm" else []  # a scratch LM's tokenizer is trained on it
    tokenizer = load_tokenizer(tc.model, tc.kind, corpus=corpus)
    return FinetuneSpec(
        kind=tc.kind, model=tc.model, tokenizer=tokenizer, labels=labels,
        train_inputs=list(data.train.text), train_targets=_targets(tc, data.train, labels),
        val_inputs=list(data.validation.text), val_targets=_targets(tc, data.validation, labels),
        epochs=tc.epochs, batch_size=tc.batch_size, learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay, warmup_ratio=tc.warmup_ratio, deepspeed=config.deepspeed,
        seed=config.seed, tracking_uri=registry.tracking_uri, chaos=chaos)


def run_name(task: str, kind: str = "finetune") -> str:
    return f"{task}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def fit_and_register(config: TrainingConfig, registry: Registry, task: str, data: TaskData, *,
                     storage_path: str, use_gpu: bool, chaos: Chaos | None = None,
                     tags: dict | None = None, resume: str | None = None) -> JobResult:
    """Fine-tune on `data`, evaluate every holdout and register a new version of `task`.

    `resume` names an earlier run under `storage_path`: Ray Train restores its checkpoints and
    training continues after the last finished epoch (for a command that was killed)."""
    started = time.perf_counter()
    if resume and resume not in run_names(storage_path, ""):
        raise UnknownName("run to resume", resume, run_names(storage_path, f"{task}-finetune-"))
    registry.check()
    spec = make_spec(config, registry, task, data, chaos)
    name = resume or run_name(task)
    print(f"run {name}: checkpoints in {storage_path}/{name} (continue it with --resume {name})",
          file=sys.stderr, flush=True)
    result = run_finetune(spec, name=name, storage_path=storage_path,
                          workers=config.workers, use_gpu=use_gpu,
                          resources=config.worker_resources(use_gpu),
                          max_failures=config.max_failures)
    return register_model_dir(config, registry, task, data, result.model_dir, spec.labels,
                              history=result.history, ds_config=result.ds_config,
                              started=started, tags=tags)


def register_model_dir(config: TrainingConfig, registry: Registry, task: str, data: TaskData,
                       model_dir: Path, labels: list[str], *, history: list[dict], ds_config: dict,
                       started: float, tags: dict | None = None,
                       extra_params: dict | None = None) -> JobResult:
    """Evaluate a consolidated model folder on the holdouts and register it."""
    tc = task_config(config, task)
    write_meta(model_dir, {"kind": tc.kind, "labels": labels, "max_length": tc.model.max_length,
                           "task": task})
    task_model = TaskModel.from_folder(model_dir)
    model, tokenizer = task_model.model, task_model.tokenizer
    profile = None
    if tc.kind == "classification":
        metrics = evaluate_classifier(model, tokenizer, data.holdouts, labels, tc.model.max_length)
        held_out = pd.concat([data.validation, data.holdouts.get(data.scenario, data.validation[:0])])
        profile = reference_profile(model, tokenizer, held_out, labels, tc.model.max_length)
    else:
        metrics = evaluate_lm(model, tokenizer, data.holdouts, tc.model.max_length)
    golden = golden_set(tc)
    metrics["golden"] = measure(lambda df: task_model.predict(None, df), golden, tc.kind)
    params = {**{k: v for k, v in tc.model_dump().items() if k not in ("model", "holdouts")},
              "model_source": tc.model.source, "max_length": tc.model.max_length,
              "workers": config.workers, "deepspeed_stage": config.deepspeed.stage,
              "seed": config.seed, "scenario": data.scenario, **(extra_params or {})}
    record = RunRecord(
        task=task, model_dir=model_dir, params=params, history=history, holdout_metrics=metrics,
        ds_config=ds_config,
        datasets={f"{tc.dataset}:{data.scenario}": data.train,
                  **{f"{tc.dataset}-holdout:{h}": df for h, df in data.holdouts.items()},
                  f"{tc.dataset}-golden:base": golden},
        input_example=pd.DataFrame({"text": list(data.train.text[:2])}), tags=tags or {},
        profile=profile, golden=golden)
    version: RegisteredVersion = registry.record(record)
    return JobResult(model=version.name, version=version.version, alias=version.alias,
                     run_id=version.run_id, model_uri=version.model_uri, metrics=metrics,
                     history=history, model_dir=str(model_dir),
                     seconds=round(time.perf_counter() - started, 1))


def with_overrides(config: TrainingConfig, task: str, **overrides) -> TrainingConfig:
    """A copy of `config` with the command line's overrides (None means keep)."""
    config = config.model_copy(deep=True)
    if overrides.get("workers") is not None:
        config.workers = overrides["workers"]
    if overrides.get("deepspeed_stage") is not None:
        config.deepspeed = replace_model(config.deepspeed, stage=overrides["deepspeed_stage"])
    if overrides.get("epochs") is not None:
        tasks = dict(config.tasks)
        tasks[task] = replace_model(task_config(config, task), epochs=overrides["epochs"])
        config.tasks = tasks
    return config


def replace_model(model, **changes):
    """A validated copy of a pydantic model with `changes`."""
    return type(model).model_validate({**model.model_dump(), **changes})
