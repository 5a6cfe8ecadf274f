"""`llmops tune`: a Ray Tune search over learning rate and epochs of the same DeepSpeed trainer.

Each trial launches a `TorchTrainer` (the Ray Train V2 pattern); `TuneReportCallback` forwards
its per-epoch `val_loss` to Tune, where ASHA stops weak trials early. The best trial's last
checkpoint is consolidated, evaluated and registered like any fine-tune.
"""

from __future__ import annotations

import dataclasses
import time

from training.config import TrainingConfig, TuneConfig
from training.errors import TrainingFailed
from training.finetune import FinetuneSpec, consolidated, fit
from training.job import JobResult, make_spec, recorded, register_model_dir, run_name
from training.lineage import model_version
from training.registry import Registry
from training.taskdata import build_task_data


def tune_task(config: TrainingConfig, tune_config: TuneConfig, registry: Registry, task: str, *,
              storage_path: str, use_gpu: bool, scenario: str = "base") -> JobResult:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    started = time.perf_counter()
    registry.check()
    data = build_task_data(config, task, scenario)
    spec = make_spec(config, registry, task, data)
    name = run_name(task, "tune")

    def trial(params: dict, spec: FinetuneSpec) -> None:
        trial_spec = dataclasses.replace(spec, learning_rate=params["learning_rate"],
                                         epochs=params["epochs"])
        fit(trial_spec, name=f"{name}-{tune.get_context().get_trial_id()}",
            storage_path=storage_path, workers=config.workers, use_gpu=use_gpu,
            resources=config.worker_resources(use_gpu), max_failures=config.max_failures,
            callbacks=[TuneReportCallback()])

    tuner = tune.Tuner(
        # The trial only drives the trainer, whose workers hold the CPUs; Tune refuses an empty
        # request, so the driver asks for one byte of memory instead of a CPU.
        tune.with_resources(tune.with_parameters(trial, spec=spec), {"CPU": 0, "memory": 1}),
        param_space={"learning_rate": tune.choice(tune_config.learning_rates),
                     "epochs": tune.choice(tune_config.epochs)},
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=tune_config.trials,
            max_concurrent_trials=tune_config.concurrent_trials, scheduler=ASHAScheduler(
                time_attr="training_iteration", max_t=max(tune_config.epochs),
                grace_period=min(tune_config.grace_period, max(tune_config.epochs)))),
        run_config=tune.RunConfig(name=name, storage_path=storage_path),
    )
    with recorded(config, registry, task, data, name) as run:
        grid = tuner.fit()
        ok = [r for r in grid if r.error is None and "checkpoint_path" in (r.metrics or {})]
        if not ok:
            raise TrainingFailed(f"every trial of {name!r} failed: {grid.errors[:1]}")
        best = min(ok, key=lambda r: r.metrics["val_loss"])
        with consolidated(best.metrics["checkpoint_path"], storage_path, name,
                          spec.kind) as (model_dir, ds_config):
            job = register_model_dir(
                config, registry, task, data, model_dir, spec.labels,
                history=best.metrics["history"], ds_config=ds_config, started=started,
                extra_params={"tune_trials": len(grid),
                              "learning_rate": best.config["learning_rate"],
                              "epochs": best.config["epochs"]},
                tags={"llmops.tune_run": name})
        run.outputs.append(model_version(registry.tracking_uri, task, job.version))
    return job
