"""Typed configuration of the training package: tasks, models, DeepSpeed and the registry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from training.errors import UnknownName

BUNDLED_ENCODER = "all-MiniLM-L6-v2"


def _yaml_bool(value: Any) -> Any:
    """YAML reads a bare `yes` / `no` as a boolean; take it back as the word."""
    return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


# Whether to use GPUs: `auto` when the cluster has them.
GpuChoice = Annotated[Literal["auto", "yes", "no"], BeforeValidator(_yaml_bool)]
SCRATCH = "scratch"


class StrictModel(BaseModel):
    """The base of every settings model: unknown keys and invalid assignments are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)



class ModelSpec(StrictModel):
    """Where a fine-tune starts from.

    `source` is the bundled encoder (`all-MiniLM-L6-v2`), `scratch` (a fresh model built from
    `architecture`), a local Hugging Face model folder, or a registered `models:/NAME@ALIAS`.
    """

    source: str = BUNDLED_ENCODER
    architecture: dict[str, Any] = Field(default_factory=dict)
    max_length: int = Field(64, ge=8, le=512)
    tokenizer_vocab_size: int = Field(2000, ge=300, description="BPE vocab trained for scratch LMs")
    freeze_embeddings: bool = Field(
        False, description="keep the token embeddings fixed: half the parameters of a small "
        "encoder, so half the gradient traffic between workers, and the pretrained vocabulary kept")


class LoraSpec(StrictModel):
    """A LoRA adapter's shape (PEFT `LoraConfig`): only these low-rank matrices train, the base
    stays frozen, and the registered version is the adapter alone."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="scale of the update: alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, min_length=1, description="names of the layers to adapt (the last part of their "
        "path, e.g. q_proj, v_proj; `all-linear` for every linear layer but the output); "
        "empty: PEFT's default for the architecture")


class DistillSpec(StrictModel):
    """A task's peak fallback (`llmops distill`, `training/distill.py`): a student with fewer
    layers trained on the champion's soft labels, kept only if it loses at most `margin` of
    the gate metric to the champion."""

    layers: int = Field(2, ge=1, description="the student's layers (a pretrained source keeps "
                        "its first ones: 2 of MiniLM's 6)")
    temperature: float = Field(2.0, gt=0, description="softens the champion's probabilities "
                               "the student learns from")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of those soft labels against the "
                         "true labels in the loss")
    margin: float = Field(0.03, ge=0, le=1, description="the fallback gate: the most the "
                          "student may lose to the champion on the base holdout and the golden "
                          "set")
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="higher than a fine-tune's: "
                                 "the cut layers and a fresh head have more to learn")


class TaskConfig(StrictModel):
    """One trainable task: which dataset, which kind of model, how long, and how (`method`:
    every weight, or a LoRA adapter over a frozen base)."""

    dataset: Literal["support-tickets", "moderation", "advisor-questions"]
    kind: Literal["classification", "causal-lm"]
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: Literal["full", "lora"] = "full"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    label_priors: dict[str, float] | None = None
    label_noise: float = Field(0.0, ge=0, lt=0.5, description="the share of its labels given at "
                               "random (annotators' mistakes, as their disagreement tells): "
                               "conformal sets then hold the true label at the error rate, not "
                               "the noisy one (training/calibration.py)")
    train_size: int = Field(2400, ge=1)
    holdout_size: int = Field(300, ge=1)
    holdouts: list[str] = Field(default_factory=lambda: ["base"])
    golden_size: int = Field(200, ge=16, description="rows of the golden set (training/evaluate.py)")
    epochs: int = Field(2, ge=1, le=100)
    batch_size: int = Field(16, ge=1, le=1024)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _lora_needs_a_pretrained_causal_lm(self) -> TaskConfig:
        if self.method == "lora" and self.kind != "causal-lm":
            raise ValueError("method lora adapts causal language models; a classifier trains "
                             "with method full")
        if self.method == "lora" and self.model.source in (SCRATCH, BUNDLED_ENCODER):
            raise ValueError(f"method lora adapts a pretrained base: set model.source to a "
                             f"model folder, models:/NAME/VERSION or a hub id, not "
                             f"{self.model.source!r}")
        return self


class DeepSpeedConfig(StrictModel):
    """ZeRO stage and precision; bf16 is used on GPUs that support it."""

    stage: int = Field(2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = "auto"
    gradient_clipping: float = Field(1.0, ge=0)


def _default_tasks() -> dict[str, TaskConfig]:
    from training.data import DATASETS

    gpt2_tiny = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 128}
    # a generator's student (one of its two layers, from scratch) needs longer than a
    # classifier's: 3 epochs at 1e-3 left the rewriter's at 0.31 token F1, these at 0.996
    gpt2_student = DistillSpec(layers=1, epochs=15, learning_rate=3e-3)
    # the seeded generator's labels are wrong at a known rate (its annotators): its classifiers
    # are calibrated knowing so
    noise = {name: lexicon.label_noise for name, lexicon in DATASETS.items()}
    return {
        "support-router": TaskConfig(
            dataset="support-tickets", kind="classification", train_size=2400, epochs=2,
            model=ModelSpec(freeze_embeddings=True), label_noise=noise["support-tickets"],
            learning_rate=1e-4, holdouts=["base", "new-product", "label-shift", "concept-shift",
                                          "slang"]),
        "moderation": TaskConfig(
            dataset="moderation", kind="classification", train_size=1600, epochs=2,
            model=ModelSpec(freeze_embeddings=True), label_noise=noise["moderation"],
            learning_rate=1e-4, holdouts=["base", "new-product", "slang"]),
        "rewriter": TaskConfig(
            dataset="moderation", kind="causal-lm", label_priors={"toxic": 1.0}, train_size=2000,
            holdout_size=200, epochs=6, batch_size=32, learning_rate=2e-3, holdouts=["base", "slang"],
            model=ModelSpec(source=SCRATCH, architecture=gpt2_tiny, max_length=96),
            distill=gpt2_student),
        "support-reply": TaskConfig(
            dataset="support-tickets", kind="causal-lm", train_size=2000, holdout_size=200,
            epochs=6, batch_size=32, learning_rate=2e-3, holdouts=["base", "new-product"],
            model=ModelSpec(source=SCRATCH, architecture=gpt2_tiny, max_length=128),
            distill=gpt2_student),
        # the advisor's intent: the bundled encoder cut to its first 2 of 6 layers (a question
        # is short and its intent lexical: 3x cheaper to train and serve, little accuracy lost)
        "advisor-intent": TaskConfig(
            dataset="advisor-questions", kind="classification", train_size=1200, epochs=3,
            label_noise=noise["advisor-questions"],
            model=ModelSpec(architecture={"num_hidden_layers": 2}, freeze_embeddings=True),
            learning_rate=1e-3, holdouts=["base", "new-product", "slang"]),
    }


class RetrainConfig(StrictModel):
    """What a retrain on drift learns from: labelled recent traffic plus a replay sample of the
    champion's own training rows (against forgetting)."""

    min_labelled: int = Field(60, ge=10, description="labelled recent requests a retrain needs")
    recent_holdout_share: float = Field(0.3, gt=0, lt=1, description="of the labelled recent "
                                        "requests, held out for the evaluation gate")
    recent_repeats: int = Field(2, ge=1, le=20, description="times the newest labelled recent "
                                "rows are repeated in the training set")
    recency_half_life_s: float | None = Field(
        86400, gt=0, description="a labelled recent row's repeats halve with each this many "
        "seconds its request is older than the newest (never under one); null: all alike")
    replay_rows: int = Field(1200, ge=0, description="rows of the champion's training data mixed in")
    validation_rows: int = Field(200, ge=16, description="held out of the mix for early stopping "
                                 "and calibration; its labels anchor the new version's reference")
    served_rows: int = Field(500, ge=0, description="requests since the drift's onset (the "
                             "newest unlabelled ones, held-out labelled ones in their share), "
                             "profiled as the retrained version's drift reference: the traffic it "
                             "is retrained to serve (0: its held-out rows, mostly replay, whose mix "
                             "the drifted traffic no longer has)")
    resolve_contradictions: bool = Field(
        True, description="resolve replayed and golden rows that recent feedback contradicts "
        "(concept shift, `training/contradiction.py`)")
    drop_label_mistakes: bool = Field(
        True, description="leave out of the rows learnt from a labelled recent row whose own "
        "phrasing's labels say another label (an annotator's mistake, `training/noise.py`)")
    recent_calibration_share: float | None = Field(
        0.5, gt=0, lt=1, description="of the retrained version's calibration rows' weight, the "
        "share of the labelled requests since the drift (weighted conformal, "
        "`training.retrain.calibration_rows`); null: all rows alike")
    champion_weight: float = Field(
        0.4, ge=0, lt=1, description="share of the champion's weights the retrained version "
        "keeps (WiSE-FT, `training/interpolation.py`): what no label spoke about keeps the "
        "champion's answer; 0 where feedback shows a concept shift; 0: none")
    contradicted_replay: Literal["relabel", "retire"] = Field(
        "relabel", description="what becomes of a contradicted replay row: it takes the label "
        "its region moved to, or it is dropped (golden rows are always retired)")


class GateConfig(StrictModel):
    """Promote a challenger only if it beats the champion on recent labelled traffic by
    `margin` and loses no more than `tolerance` on the original holdout (the golden set)."""

    metric: Literal["accuracy", "macro_f1"] = "macro_f1"
    margin: float = Field(0.02, ge=0, le=1)
    tolerance: float = Field(0.02, ge=0, le=1)


class TrainingConfig(StrictModel):
    """How fine-tunes run: workers, DeepSpeed, seed, and the tasks that can be trained."""

    workers: int = Field(2, ge=1, le=256)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: GpuChoice = "auto"
    gpu_resource: str | None = Field(
        None, description="a custom Ray resource each GPU worker also asks for (1): declared only "
        "by the fine-tuning GPU node type (cluster.yaml), so workers land on those nodes")
    storage_path: str | None = Field(
        None, description="Ray Train checkpoints and results: empty: <data_dir>/ray_results; on "
        "a cluster of several nodes a URI every node reaches (s3://bucket/checkpoints, gs://...)")
    seed: int = 0
    max_failures: int = Field(2, ge=0)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tasks: dict[str, TaskConfig] = Field(default_factory=_default_tasks)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)

    def worker_resources(self, use_gpu: bool) -> dict[str, float]:
        """What each Ray Train worker asks the scheduler for (one GPU each on GPUs)."""
        gpu = {"GPU": 1, **({self.gpu_resource: 1} if self.gpu_resource else {})} if use_gpu else {}
        return {"CPU": self.cpus_per_worker, **gpu}

    def task(self, name: str) -> TaskConfig:
        if name not in self.tasks:
            raise UnknownName("task", name, list(self.tasks))
        return self.tasks[name]

    def overridden(self, task: str, *, workers: int | None = None,
                   deepspeed_stage: int | None = None, epochs: int | None = None) -> TrainingConfig:
        """A validated copy with the command line's overrides (None keeps the setting)."""
        self.task(task)
        data = self.model_dump()
        if workers is not None:
            data["workers"] = workers
        if deepspeed_stage is not None:
            data["deepspeed"]["stage"] = deepspeed_stage
        if epochs is not None:
            data["tasks"][task]["epochs"] = epochs
        return TrainingConfig.model_validate(data)

    def starting_from(self, task: str, source: str, **update) -> TrainingConfig:
        """A copy whose `task` starts from `source` (a registered version, or its folder)
        instead of its configured model, as a retrain does; `update`: other fields of the task."""
        tc = self.task(task)
        return self.model_copy(update={"tasks": {**self.tasks, task: tc.model_copy(update={
            **update, "model": tc.model.model_copy(update={"source": source,
                                                           "architecture": {}})})}})

    @field_validator("tasks", mode="before")
    @classmethod
    def _merge_task_defaults(cls, value: Any) -> Any:
        """A task named in the settings file overrides only the fields it names."""
        if not isinstance(value, dict):
            return value
        merged = {k: v.model_dump() for k, v in _default_tasks().items()}
        for name, task in value.items():
            if isinstance(task, TaskConfig):
                task = task.model_dump()
            base = merged.get(name, {})
            model = {**base.get("model", {}), **task.get("model", {})}
            merged[name] = {**base, **task, **({"model": model} if model else {})}
        return merged


class TuneConfig(StrictModel):
    """A small search over learning rate and epochs with ASHA early stopping."""

    trials: int = Field(4, ge=1, le=100)
    learning_rates: list[float] = Field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    epochs: list[int] = Field(default_factory=lambda: [1, 2])
    grace_period: int = Field(1, ge=1)
    concurrent_trials: int = Field(
        1, ge=1, le=100, description="trials whose trainers run at once: one each takes every "
        "CPU a trial's workers need, so more than one pays off on a cluster with room for them")


class LineageConfig(StrictModel):
    """Where OpenLineage run events go (`training/lineage.py`)."""

    transport: Literal["file", "http", "none"] = "file"
    file: str | None = Field(None, description="JSON lines; empty: <data_dir>/lineage/events.jsonl")
    url: str | None = Field(None, description="an OpenLineage HTTP endpoint (Marquez: "
                            "http://marquez:5000), for transport http")
    namespace: str = Field("llmops", min_length=1, description="the jobs' namespace")

    @model_validator(mode="after")
    def _url_for_http(self) -> LineageConfig:
        if self.transport == "http" and not (self.url or "").startswith(("http://", "https://")):
            raise ValueError("lineage transport http needs url: http(s)://HOST:PORT")
        return self


class RegistryConfig(StrictModel):
    """MLflow tracking and registry; empty `tracking_uri` means SQLite under the data dir.
    `lineage`: the run events of what is trained, registered and served."""

    tracking_uri: str | None = None
    experiment: str = "llmops"
    timeout_s: float = Field(10.0, gt=0)
    lineage: LineageConfig = Field(default_factory=LineageConfig)

    @model_validator(mode="after")
    def _known_scheme(self) -> RegistryConfig:
        uri = self.tracking_uri
        if uri and not uri.startswith(("http://", "https://", "sqlite:///", "file:", "databricks")):
            raise ValueError(f"tracking_uri must be http(s)://, sqlite:/// or file:, got {uri!r}")
        return self

