"""Typed configuration of one model deployment (`ModelDeploymentConfig`) and its parts:
batching, autoscaling, resources, the canary, generation and the peak fallback. What a replica
may change in place (`reconfigure()`: model version, canary, batching, generation) lives in
`ModelDeploymentConfig.user_config()`; replica resources and autoscaling need new replicas.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from serve_apps.tool_calls import ToolParser
from training.config import StrictModel


class BatchingConfig(StrictModel):
    """`@serve.batch`: a batch closes when full or when the oldest request waited this long."""

    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)


class AutoscalingConfig(StrictModel):
    """Ray Serve's autoscaling policy; `min_replicas: 0` scales an idle deployment to zero."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    look_back_period_s: float = Field(30, gt=0, description="window the load is averaged over")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ResourcesConfig(StrictModel):
    """What one replica asks Ray for; `num_gpus` applies only when the cluster has GPUs."""

    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.25, ge=0, le=8)
    memory_mb: int | None = Field(None, ge=1)
    threads: int | None = Field(
        None, ge=1, le=512, description="torch's threads for the replica's forward passes "
        "(empty: what Ray sets, the whole CPUs of num_cpus and at least 1; inline: the pipeline "
        "replica's). A generator's continuous batch runs one forward pass at a time, so where "
        "its neighbours leave cores idle, more threads answer sooner; past the idle cores they "
        "take turns with the other replicas")


class CanaryConfig(StrictModel):
    """A challenger beside the champion: `fraction` of request ids (sticky) go to it, or with
    `shadow` it sees a copy of them while the user gets the champion's answer."""

    model: str = Field(description="models:/NAME@ALIAS or models:/NAME/VERSION")
    alias: str | None = Field(None, description="set when the version was pinned from an alias")
    fraction: float = Field(0.2, ge=0, le=1, description="the one default of every canary: "
                            "`llmops canary` and the loop's (`controller.canary.fraction`)")
    shadow: bool = False


class GenerationConfig(StrictModel):
    """Defaults for generated text; requests may lower `max_new_tokens` or set their own."""

    max_new_tokens: int = Field(48, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = 0
    stop: list[str] = Field(default_factory=lambda: ["\n"], max_length=4,
                            description="the answer ends before the first of these")
    piece_timeout_s: float = Field(30, gt=0, le=600, description="a streamed answer whose next "
                                   "piece takes longer ends with an error and its generation "
                                   "is stopped")
    continuous_batching: bool = Field(True, description="greedy answers join the running batch "
                                      "at every step, streams included (serve_apps/engine.py); "
                                      "off: one generate per batch of requests")
    max_batch_tokens: int = Field(512, ge=16, description="tokens per step of the continuous "
                                  "batch: one per decoding request, the rest prefills prompts")
    kv_cache_tokens: int = Field(16384, ge=256, description="KV cache of the continuous batch, "
                                 "in tokens of all its requests together (allocated per loaded "
                                 "model when its first request arrives)")
    tool_parser: ToolParser = Field("hermes", description="how the model writes tool calls "
                                    "(`serve_apps/tool_calls.py`): `hermes` (<tool_call>{...}"
                                    "</tool_call>: Qwen 2.5-3, Hermes) or `json` (the answer a "
                                    "JSON call or a list of them: Llama 3.1-3.3)")


class PeakFallbackConfig(StrictModel):
    """A classifier's peak fallback (`serve_apps/pressure.py`): while its pipeline replica is
    under pressure, `model` (a distilled student, `llmops distill`) answers instead, and the
    pipeline skips its generation (`generation`). On when either `enter_*` threshold is
    crossed; off once both are back under their `exit_*` and it has been on `min_on_s`. A
    generator's: its student, and in chat (no classifier) the switch too, thresholds and all
    (set them for generated answers, which take far longer than a classification)."""

    model: str = Field(description="models:/NAME@fallback or models:/NAME/VERSION")
    alias: str | None = Field(None, description="set when the version was pinned from an alias")
    enter_ongoing: int = Field(48, ge=1, description="requests in flight in the pipeline replica")
    exit_ongoing: int = Field(16, ge=0)
    enter_p95_ms: float = Field(500, gt=0, description="p95 latency of the answers of the last "
                                "`window_s`, at the pipeline replica")
    exit_p95_ms: float = Field(200, gt=0)
    window_s: float = Field(5, gt=0)
    min_on_s: float = Field(5, ge=0, description="once on, at least this long")
    generation: Literal["skip", "keep"] = Field(
        "skip", description="while on, skip the pipeline's generator: moderation hides a post "
        "to rewrite, support suggests the closest resolved ticket's reply (both `degraded`, as "
        "when the generator's breaker is open): a generated answer costs more than a "
        "classification, with a real LLM by far. keep: generate, by the generator's own "
        "student where it has one (its `fallback`)")

    @model_validator(mode="after")
    def _hysteresis(self) -> PeakFallbackConfig:
        if self.exit_ongoing >= self.enter_ongoing or self.exit_p95_ms >= self.enter_p95_ms:
            raise ValueError("fallback: each exit_* threshold must be below its enter_*")
        return self


_SERVED_NAME = re.compile(r"^[\w.:-]{1,128}$")


class ModelDeploymentConfig(StrictModel):
    """One model deployment: which registered model, how it batches, scales and is placed."""

    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or all-MiniLM-L6-v2")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_ongoing_requests: int = Field(64, ge=1)
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="auto: fp16 on GPU, fp32 on CPU; int8: quantized linear layers on "
        "CPU (faster; scores depend slightly on the batch a text lands in)")
    canary: CanaryConfig | None = None
    fallback: PeakFallbackConfig | None = Field(
        None, description="the distilled student that answers at peaks: a classifier's, with "
        "the switch's thresholds; a generator's, by which a pipeline whose classifier's "
        "fallback says `generation: keep` generates at a peak (only its model is read), or "
        "chat's, with the switch's thresholds (chat has no classifier)")
    generation: GenerationConfig | None = None
    adapters: dict[str, str] = Field(
        default_factory=dict, description="a generator's LoRA adapters, served over `model` "
        "(their base) by the name a request picks them with (the OpenAI `model` field): "
        "models:/NAME@ALIAS or models:/NAME/VERSION of adapter versions trained on that base")
    adapter: str | None = Field(None, description="the adapter (a name in `adapters`) that "
                                "answers requests naming none, the pipeline's own included; "
                                "empty: the base")
    max_adapters: int = Field(4, ge=1, le=256, description="adapters a replica holds at once; "
                              "past them the least recently used is dropped")
    error_rate: float | None = Field(
        None, gt=0, lt=1, description="classifiers: the error rate of conformal prediction sets "
        "(`training/calibration.py`); an answer whose set is not exactly one label abstains "
        "(support: the review queue; moderation: held for review). Empty: never abstain")
    placement: Literal["auto", "inline", "replica"] = Field(
        "auto", description="inline: inside the pipeline replica (no hop; its resources are "
        "added to the pipeline's, it scales with the pipeline and `autoscaling` is unused); "
        "replica: a deployment of its own; auto: inline unless it gets a GPU or generates text")

    @model_validator(mode="after")
    def _adapters(self) -> ModelDeploymentConfig:
        from training.refs import model_name

        for name, ref in self.adapters.items():
            if not _SERVED_NAME.match(name) or name == model_name(self.model):
                raise ValueError(f"adapter name {name!r}: letters, digits and ._:- only, and not "
                                 f"the base's own name")
            model_name(ref)  # a reference, else the error says what one looks like
        if self.adapter is not None and self.adapter not in self.adapters:
            raise ValueError(f"adapter {self.adapter!r} is not one of adapters "
                             f"{sorted(self.adapters)}")
        if self.adapters and self.precision == "int8":
            raise ValueError("LoRA adapters need a base in fp32 or fp16, not int8")
        return self

    def inline(self, use_gpu: bool, generates: bool) -> bool:
        """Whether this model runs inside its pipeline's replica (`placement`). `auto` keeps a
        generator in a process of its own: its token loop holds the GIL for long stretches,
        which would stall the pipeline's requests and the other models sharing its replica."""
        if self.placement == "auto":
            return not (use_gpu and self.resources.num_gpus > 0) and not generates
        return self.placement == "inline"

    @property
    def generation_config(self) -> GenerationConfig:
        """The generation defaults of this deployment (GenerationConfig's when unset)."""
        return self.generation or GenerationConfig()

    def user_config(self, model: str, alias: str | None, canary: CanaryConfig | None,
                    adapters: dict[str, dict] | None = None,
                    fallback: PeakFallbackConfig | None = None) -> dict:
        """What `reconfigure()` receives (with the model and adapters pinned to versions):
        changes here swap in place, without new replicas."""
        return {"model": model, "alias": alias, "precision": self.precision,
                "error_rate": self.error_rate,
                "batching": self.batching.model_dump(),
                "canary": canary.model_dump() if canary else None,
                **({"fallback": fallback.model_dump()} if fallback else {}),
                "generation": self.generation_config.model_dump(),
                **({"threads": self.resources.threads} if self.resources.threads else {}),
                **({"adapters": adapters, "adapter": self.adapter,
                    "max_adapters": self.max_adapters} if self.adapters else {})}
