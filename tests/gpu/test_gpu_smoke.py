"""The GPU path, on a machine with CUDA (skipped elsewhere): a pipeline served from GPU replicas
in half precision, and a DeepSpeed ZeRO-2 fine-tune over NCCL. Run alone with
`pytest tests/gpu -s` on a GPU node; it starts its own Ray, which sees the real GPUs."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import register_quick, tiny_settings

pytestmark = [pytest.mark.own_ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def gpu_ray():
    import ray

    from cluster.runtime import PLATFORM_ENV

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": dict(PLATFORM_ENV)})
    assert ray.cluster_resources().get("GPU", 0) >= 1
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_pipeline_served_on_gpu_in_half_precision(gpu_ray, tmp_path):
    from ray import serve

    from serve_apps.apps import moderation
    from serve_apps.model import load
    from training.registry import Registry

    settings = tiny_settings(tmp_path / "state")
    registry = Registry(settings.registry, settings.data_dir)
    register_quick(settings, registry, "moderation")
    register_quick(settings, registry, "rewriter")

    loaded = load("models:/moderation@champion", registry.tracking_uri, "auto")
    weight = next(loaded.model.parameters())
    assert weight.device.type == "cuda" and weight.dtype == torch.float16

    config = settings.serve.moderation.model_copy(update={"policies": []})
    app = moderation({"config": config.model_dump(mode="json"),
                      "limits": settings.serve.limits.model_dump(),
                      "tracking_uri": registry.tracking_uri, "use_gpu": True,
                      "gpu_resource": None, "ingress_cpus": 0.1})
    handle = serve.run(app, name="moderation", route_prefix=None)
    texts = ["you are an idiot", "hello there", "call me at 555-0100"] * 6
    started = time.perf_counter()
    answer = handle.moderate.remote({"texts": texts}).result(timeout_s=120)
    print(f"GPU moderation of {len(texts)} texts: {time.perf_counter() - started:.3f} s")
    assert len(answer.results) == len(texts)
    assert {r.label for r in answer.results} <= set(loaded.meta["labels"])
    replicas = serve.status().applications["moderation"].deployments
    assert all(d.status == "HEALTHY" for d in replicas.values())


def test_zero2_finetune_step_over_nccl(gpu_ray, tmp_path):
    from training.job import fit_and_register
    from training.registry import Registry
    from training.taskdata import build_task_data
    from training.worker import deepspeed_config

    settings = tiny_settings(tmp_path / "state", workers=1, use_gpu="yes",
                             deepspeed={"stage": 2})
    tasks = dict(settings.training.tasks)
    tasks["moderation"] = tasks["moderation"].model_copy(update={"epochs": 1})
    settings.training.tasks = tasks
    registry = Registry(settings.registry, settings.data_dir)
    data = build_task_data(settings.training, "moderation")
    started = time.perf_counter()
    result = fit_and_register(settings.training, registry, "moderation", data,
                              storage_path=settings.storage_path, use_gpu=True)
    print(f"ZeRO-2 fine-tune on GPU: {time.perf_counter() - started:.1f} s, "
          f"{result.history[-1]['samples_per_s']:.0f} samples/s")
    assert result.version == 1 and result.history
    assert deepspeed_config(settings.training.deepspeed, 16, on_gpu=True)["bf16"]["enabled"] \
        == torch.cuda.is_bf16_supported()
