"""Shared fixtures: one real Ray instance per session, tiny model configs, a fresh registry."""

from __future__ import annotations

import os

import pytest

from cluster.runtime import PLATFORM_ENV, apply_platform_env
from cluster.settings import Settings

os.environ["RAY_AUTH_MODE"] = "disabled"
apply_platform_env()

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64}
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 96}


def tiny_settings(data_dir, **training) -> Settings:
    """Settings whose tasks train in seconds: scratch models, a few hundred rows."""
    classifier = {"model": {"source": "scratch", "architecture": TINY_BERT, "max_length": 48},
                  "train_size": 192, "holdout_size": 48, "epochs": 2, "batch_size": 16,
                  "learning_rate": 1e-3}
    tasks = {
        "support-router": {**classifier, "holdouts": ["base", "new-product"],
                           "model": {**classifier["model"], "freeze_embeddings": True}},
        "moderation": {**classifier, "holdouts": ["base"]},
        "rewriter": {"model": {"source": "scratch", "architecture": TINY_GPT2, "max_length": 64,
                               "tokenizer_vocab_size": 400},
                     "train_size": 96, "holdout_size": 24, "epochs": 1, "holdouts": ["base"]},
    }
    return Settings.model_validate({
        "data_dir": str(data_dir),
        "ray": {"include_dashboard": False},
        "training": {"workers": 2, "max_failures": 2, "tasks": tasks, **training},
    })


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 logical CPUs, like CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
             runtime_env={"env_vars": dict(PLATFORM_ENV)})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return tiny_settings(tmp_path / "state")


@pytest.fixture
def registry(settings):
    from training.registry import Registry

    return Registry(settings.registry, settings.data_dir)
