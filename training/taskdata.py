"""A task's data: training rows, a validation split and named holdouts, and the checks that they
can train the task. Light to import (pandas and the generator only): the CLI validates a
command's task, scenario and data with it before loading the training stack."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from training import data as datagen
from training.config import TaskConfig, TrainingConfig
from training.errors import InvalidData
from training.lineage import Dataset


@dataclass
class TaskData:
    """Training rows, a small validation split (for early stopping) and named holdouts, and
    where they came from (`sources`: the lineage of what is trained on them)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    holdouts: dict[str, pd.DataFrame]
    scenario: str = "base"
    sources: list[Dataset] = field(default_factory=list)
    golden: pd.DataFrame | None = None  # a retrain's: its champion's, less contradicted rows
    notes: dict = field(default_factory=dict)  # what shaped the set (a retrain's contradictions)
    served: pd.DataFrame | None = None  # a retrain's: unlabelled texts of the drifted traffic

    def save(self, folder: Path) -> Path:
        """As Parquet files (what a retrain job reads back with `load`)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, df in {"train": self.train, "validation": self.validation,
                         **{f"holdout-{h}": df for h, df in self.holdouts.items()}}.items():
            df.to_parquet(folder / f"{name}.parquet", index=False)
        (folder / "scenario").write_text(self.scenario)
        (folder / "sources.json").write_text(json.dumps([s.to_dict() for s in self.sources]))
        (folder / "notes.json").write_text(json.dumps(self.notes))
        for name, df in (("golden", self.golden), ("served", self.served)):
            if df is not None:
                df.to_parquet(folder / f"{name}.parquet", index=False)
        return folder

    @classmethod
    def load(cls, folder: Path) -> TaskData:
        folder = Path(folder)
        if not (folder / "train.parquet").is_file():
            raise InvalidData(f"{folder} holds no train.parquet (see TaskData.save)")
        train = pd.read_parquet(folder / "train.parquet")
        listed = folder / "sources.json"
        sources = [Dataset.from_dict(d) for d in json.loads(listed.read_text())] \
            if listed.is_file() else [Dataset("file", str(folder.resolve()), len(train))]
        golden, notes, served = (folder / f for f in ("golden.parquet", "notes.json",
                                                      "served.parquet"))
        return cls(train=train, validation=pd.read_parquet(folder / "validation.parquet"),
                   holdouts={p.stem.removeprefix("holdout-"): pd.read_parquet(p)
                             for p in sorted(folder.glob("holdout-*.parquet"))},
                   scenario=(folder / "scenario").read_text().strip(), sources=sources,
                   golden=pd.read_parquet(golden) if golden.is_file() else None,
                   notes=json.loads(notes.read_text()) if notes.is_file() else {},
                   served=pd.read_parquet(served) if served.is_file() else None)


def build_task_data(config: TrainingConfig, task: str, scenario: str = "base") -> TaskData:
    """Seeded training data for `task` under `scenario`, and every configured holdout."""
    tc = config.task(task)

    def make(name: str, n: int, seed: int) -> pd.DataFrame:
        return datagen.generate(tc.dataset, name, n, seed, priors=tc.label_priors)

    seed = config.seed
    seeds = {h: seed + 1000 + i for i, h in enumerate(tc.holdouts)}

    def source(name: str, seed: int, rows: int, role: str) -> Dataset:
        return Dataset("generator", f"{tc.dataset}/{name}/seed-{seed}", rows, role)

    return TaskData(
        train=make(scenario, tc.train_size, seed),
        validation=make(scenario, min(tc.holdout_size, 200), seed + 101),
        holdouts={h: make(h, tc.holdout_size, s) for h, s in seeds.items()}, scenario=scenario,
        sources=[source(scenario, seed, tc.train_size, "training rows"),
                 *(source(h, s, tc.holdout_size, "holdout") for h, s in seeds.items())])


def validate_data(tc: TaskConfig, data: TaskData) -> list[str]:
    """The label list, after checking the data can train this task; raises InvalidData."""
    labels = datagen.labels_of(tc.dataset)
    if data.train.empty:
        raise InvalidData("the training dataset is empty")
    classifier = tc.kind == "classification"  # a causal LM learns `text` -> `rewrite`
    for name, df in {"training": data.train, **data.holdouts}.items():
        if missing := ({"text", "label"} if classifier else {"text", "rewrite"}) - set(df.columns):
            raise InvalidData(f"the {name} dataset lacks columns {sorted(missing)}")
        if classifier and (unknown := set(df["label"]) - set(labels)):
            raise InvalidData(f"the {name} dataset has labels outside {labels}: {sorted(unknown)}")
    if classifier:
        if absent := [lbl for lbl in labels if lbl not in set(data.train["label"])]:
            raise InvalidData(f"label(s) {absent} never occur in the training data; every one of "
                              f"{labels} needs examples")
    elif (data.train["rewrite"].fillna("") == "").any():
        raise InvalidData("causal-lm training rows need a non-empty 'rewrite'")
    return labels
