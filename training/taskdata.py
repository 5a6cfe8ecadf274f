"""A task's data: training rows, a validation split and named holdouts, and the checks that they
can train the task. Light to import (pandas and the generator only): the CLI validates a
command's task, scenario and data with it before loading the training stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from training import data as datagen
from training.config import TaskConfig, TrainingConfig
from training.errors import InvalidData


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


def build_task_data(config: TrainingConfig, task: str, scenario: str = "base") -> TaskData:
    """Seeded training data for `task` under `scenario`, and every configured holdout."""
    tc = config.task(task)

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
