"""Typed configuration of the serving package: the applications, their limits and TLS (one
model deployment's settings: `serve_apps/model_config.py`).

`ServeConfig` is the `serve:` section of `llmops.yaml`; `serve_apps.deploy.serve_config`
turns it into Ray Serve's own config format.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from monitoring.config import LabelQueueConfig
from serve_apps.model_config import (
    AutoscalingConfig,
    GenerationConfig,
    ModelDeploymentConfig,
    PeakFallbackConfig,
    ResourcesConfig,
)
from serve_apps.policy_config import AuthConfig, GuardrailRule, GuardrailsConfig, QuotaConfig
from serve_apps.portfolio_config import PortfolioConfig
from training.config import GpuChoice, StrictModel


class LimitsConfig(StrictModel):
    """Request limits enforced at the ingress: 422 beyond the text limits; 413 for a body past
    `max_body_bytes`, before it is parsed; 429 for a client address past its refusals, before
    its token is checked (`serve_apps/http.py`, `Edge`)."""

    max_chars: int = Field(2000, ge=1)
    max_items: int = Field(32, ge=1, description="texts per batch request")
    max_messages: int = Field(32, ge=1, description="chat messages per request")
    max_body_bytes: int | None = Field(None, ge=1024, description="empty: 6 x max_chars x the "
                                       "larger of max_items and max_messages, plus 16 KiB (room "
                                       "for JSON escapes of every character)")
    refusals_per_minute: float = Field(60, gt=0, description="refused requests (4xx) a client "
                                       "address may cause per minute, per ingress replica; past "
                                       "them (and a burst of refusal_burst) it gets 429 at once")
    refusal_burst: int = Field(30, ge=1)

    @property
    def body_bytes(self) -> int:
        return self.max_body_bytes or \
            6 * self.max_chars * max(self.max_items, self.max_messages) + 16 * 1024


def _flag_injection() -> GuardrailsConfig:
    """Moderation and support read what users wrote about anything, instructions to a model
    included: injection attempts are flagged there, not refused."""
    return GuardrailsConfig(input=[GuardrailRule(name="prompt-injection", kind="injection",
                                                 action="flag")])


Policy = Literal["audit", "auth", "quota", "guardrails"]
ABSTAIN_ERROR_RATE = 0.05  # a pipeline classifier's `error_rate` unless set (null: never abstain)


class OverloadConfig(StrictModel):
    """Load shedding at an application's ingress, done by Serve itself: past
    `max_ongoing_requests` per replica requests queue, past `max_queued_requests` they are
    refused with 503 and `Retry-After`."""

    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=-1, description="-1: no limit")
    retry_after_s: int = Field(1, ge=0)


class BreakerConfig(StrictModel):
    """The circuit breaker on a pipeline's generator (`serve_apps/breaker.py`): `failures`
    errors or timeouts within `window_s` open it; after `cooldown_s` one call probes it."""

    failures: int = Field(5, ge=1)
    window_s: float = Field(30, gt=0)
    cooldown_s: float = Field(10, gt=0)
    timeout_s: float = Field(30, gt=0, description="a generator call slower than this fails")


class _AppConfig(StrictModel):
    """What every application has: its route, its policies in the order they run
    (`serve_apps/policies.py`), its guardrail rules and its load shedding."""

    enabled: bool = True
    policies: list[Policy] = Field(default_factory=lambda: ["audit", "auth", "quota",
                                                            "guardrails"])
    guardrails: GuardrailsConfig = Field(default_factory=_flag_injection)
    overload: OverloadConfig = Field(default_factory=OverloadConfig)
    autoscaling: AutoscalingConfig | None = Field(
        None, description="the pipeline replica's, which its inline models scale with; "
        "empty: one replica")
    ingress_cpus: float | None = Field(None, gt=0, description="CPUs of the pipeline replica "
                                       "(its inline models' are added); empty: serve.ingress_cpus")

    @model_validator(mode="after")
    def _once_each(self) -> _AppConfig:
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("each policy may appear once in `policies`")
        for stage in ("classifier", "encoder"):
            if getattr(getattr(self, stage, None), "adapters", None):
                raise ValueError(f"{stage}.adapters: LoRA adapters are served by generators")
        classifier = getattr(self, "classifier", None)
        switch = getattr(classifier, "fallback", None)
        for stage in ("encoder", "generator"):
            if getattr(getattr(self, stage, None), "error_rate", None) is not None:
                raise ValueError(f"{stage}.error_rate: only classifiers abstain")
        if getattr(getattr(self, "encoder", None), "fallback", None) is not None:
            raise ValueError("encoder.fallback: the peak fallback is a classifier's or a "
                             "generator's")
        student = getattr(getattr(self, "generator", None), "fallback", None)
        if student is not None and classifier is not None and (
                switch is None or switch.generation != "keep"):
            raise ValueError("generator.fallback: a generator's student answers at a peak that "
                             "the classifier's fallback switches with `generation: keep`; set "
                             "those")
        if student is not None and classifier is None and student.generation == "skip" and \
                "generation" in student.model_fields_set:
            raise ValueError("generator.fallback.generation: chat answers nothing without its "
                             "generator; at a peak its student answers (keep)")
        if classifier is not None and "error_rate" not in classifier.model_fields_set:
            classifier.error_rate = ABSTAIN_ERROR_RATE  # however the classifier was given
        return self

    def peak_switch(self) -> PeakFallbackConfig | None:
        """The fallback whose thresholds switch this application at a peak
        (`serve_apps/pressure.py`): its classifier's; chat's, which has none, its generator's."""
        stage = getattr(self, "classifier", None) or getattr(self, "generator", None)
        return getattr(stage, "fallback", None)


def _classifier(model: str) -> ModelDeploymentConfig:
    return ModelDeploymentConfig(model=model)


def _generator() -> ModelDeploymentConfig:
    return ModelDeploymentConfig(model="models:/rewriter@champion")


class ModerationAppConfig(_AppConfig):
    """Classify a post; rewrite toxic ones with the generator; redact personal data. While the
    generator's breaker is open, or at a peak (`classifier.fallback`), a post to rewrite is
    hidden instead (`degraded`)."""

    route_prefix: str = "/v1/moderate"
    classifier: ModelDeploymentConfig = Field(
        default_factory=lambda: _classifier("models:/moderation@champion"))
    generator: ModelDeploymentConfig = Field(default_factory=_generator)
    rewrite_labels: list[str] = Field(default_factory=lambda: ["toxic"])
    block_labels: list[str] = Field(default_factory=lambda: ["spam"])
    redact_labels: list[str] = Field(default_factory=lambda: ["pii"])
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


def _reply_generator() -> ModelDeploymentConfig:
    return ModelDeploymentConfig(model="models:/support-reply@champion",
                                 generation=GenerationConfig(max_new_tokens=64, stop=[]))


class SupportAppConfig(_AppConfig):
    """Route a ticket to a queue; suggest a generated reply, or the reply of the closest resolved
    ticket when the generator is not confident, or fails, or its breaker is open, or at a peak
    (`classifier.fallback`; `degraded`)."""

    route_prefix: str = "/v1/support"
    classifier: ModelDeploymentConfig = Field(
        default_factory=lambda: _classifier("models:/support-router@champion"))
    encoder: ModelDeploymentConfig = Field(
        default_factory=lambda: ModelDeploymentConfig(model="all-MiniLM-L6-v2"))
    generator: ModelDeploymentConfig = Field(default_factory=_reply_generator)
    min_reply_confidence: float = Field(
        0.5, ge=0, le=1, description="below this generator confidence (probability of its least "
        "likely token) the reply comes from the closest resolved ticket instead; 1 = always")
    examples_per_intent: int = Field(8, ge=1, le=200,
                                     description="resolved tickets per intent in the reply index")
    review_queue: str = Field("human-review", min_length=1, description="where a ticket goes "
                              "when the router abstains (`classifier.error_rate`)")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


class ChatAppConfig(_AppConfig):
    """OpenAI-compatible chat completions over a registered causal LM. Prompt injection is
    refused here (the model follows what it reads)."""

    route_prefix: str = "/v1"
    generator: ModelDeploymentConfig = Field(default_factory=_generator)
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    fallback_reply: str | None = Field(
        "The assistant is busy right now; please try again in a minute.",
        description="the answer (`degraded`) while the generator fails or its breaker is open; "
        "empty: 503 with Retry-After instead")


class FeedbackAppConfig(_AppConfig):
    """Ground-truth labels for logged requests (needs the inference log). Labels are audited
    and need the `feedback` scope; they are charged to no quota and pass no guardrail."""

    route_prefix: str = "/v1/feedback"
    policies: list[Policy] = Field(default_factory=lambda: ["audit", "auth"])
    queue: LabelQueueConfig = Field(default_factory=LabelQueueConfig,
                                    description="the answers awaiting a label (GET /pending)")


def _advice_rules() -> GuardrailsConfig:
    """Injection is refused; a request for a product recommendation is found and answered with
    the refusal (`serve_apps/dialogue.py`); answers are composed, not generated: no output rule
    (a PII pattern must never rewrite a quoted figure)."""
    return GuardrailsConfig(
        input=[GuardrailRule(name="prompt-injection", kind="injection", action="block"),
               GuardrailRule(name="personal-recommendation", kind="advice", action="flag")],
        output=[])


class AdvisorAppConfig(_AppConfig):
    """The advisory chatbot (`POST /chat`, OpenAI-compatible `POST /chat/completions` with
    function calling, `POST /simulate`; the `advise` scope): the intent classifier and slot
    extraction decide when to simulate a portfolio. Each answer's audit record holds the tool
    call (its arguments with the seed, the figures, the configuration's digest), so `llmops
    audit replay` can run it again and compare."""

    route_prefix: str = "/v1/advisor"
    classifier: ModelDeploymentConfig = Field(default_factory=lambda: ModelDeploymentConfig(
        model="models:/advisor-intent@champion", resources=ResourcesConfig(num_cpus=0.03)))
    assistant: ModelDeploymentConfig | None = Field(
        None, description="a chat-tuned causal LM (a chat template that renders tools) that "
        "decides when to simulate, through its own tool calls, and writes the answers; every "
        "number it writes is checked, and an answer with an invented one is replaced by the "
        "template's (`serve_apps/assistant.py`). Set its `generation` (`stop: []`, a "
        "`max_new_tokens` for whole answers, its `tool_parser`). Empty: the classifier and "
        "the slots decide and templates write")
    assistant_prompt: str = Field(
        "You are a portfolio risk assistant. To answer a question about a portfolio's risk or "
        "returns, call simulate_portfolio with the holdings (weights summing to 1), the horizon "
        "in years and the risk profile the client gave, then explain its figures, quoting them "
        "exactly. Never invent a figure, and never recommend products to buy or sell.",
        min_length=1, description="the assistant's system message")
    guardrails: GuardrailsConfig = Field(default_factory=_advice_rules)
    # its simulations run as Ray tasks asking for CPUs of their own (or in the replica when none
    # is free): the replica itself reserves little, so a retrain still fits on a 2-core head
    ingress_cpus: float | None = Field(0.02, gt=0)
    portfolio: PortfolioConfig = Field(default_factory=PortfolioConfig)
    paths: int = Field(20_000, ge=100, description="paths of the simulations the chat runs")
    seed: int = Field(0, ge=0, description="their seed (recorded with each tool call)")
    disclaimer: str = Field(
        "Simulated figures under stated assumptions, not a forecast or a personal "
        "recommendation; past behaviour does not guarantee future returns.", min_length=1,
        description="sent with every answer")
    refusal: str = Field(
        "I cannot recommend specific products or tell you what to buy or sell, or when; I can "
        "simulate how a portfolio you describe might behave and explain its risk figures.",
        min_length=1, description="the answer to a personalised product recommendation request")
    other_reply: str = Field(
        "I am the portfolio simulation assistant: describe your holdings and a horizon and I "
        "will simulate their risk, or ask me what a risk measure means. For your account, fees "
        "or statements, please contact your adviser.", min_length=1,
        description="the answer to a question about anything else")

    @model_validator(mode="after")
    def _paths_within_cap(self) -> AdvisorAppConfig:
        if self.paths > self.portfolio.max_paths:
            raise ValueError(f"paths {self.paths} exceeds portfolio.max_paths "
                             f"{self.portfolio.max_paths}")
        return self


class TlsConfig(StrictModel):
    """HTTPS at Serve's proxy (its `ssl_*` HTTP options, fixed when Serve starts). PEM paths on
    the head node, where the proxy runs; `llmops tls dev-cert` makes a local set."""

    certfile: str | None = Field(None, description="the proxy's certificate (chain)")
    keyfile: str | None = Field(None, description="its private key")
    ca_certs: str | None = Field(
        None, description="the CA bundle the platform's own clients (`llmops traffic`, the demo, "
        "the benchmarks) verify the proxy against, besides the system store")

    @model_validator(mode="after")
    def _paired(self) -> TlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("serve.tls needs both certfile and keyfile, or neither")
        if self.ca_certs and not self.certfile:
            raise ValueError("serve.tls.ca_certs needs certfile and keyfile (HTTPS)")
        return self

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


class ServeConfig(StrictModel):
    """HTTP front door and the applications it serves."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    use_gpu: GpuChoice = "auto"
    gpu_resource: str | None = Field(
        None, description="a custom Ray resource every GPU replica also asks for, as much as its "
        "num_gpus: declared only by the serving GPU node type (cluster.yaml), so the autoscaler "
        "launches that type for replicas and fine-tunes keep their own GPU nodes")
    ingress_cpus: float = Field(0.1, gt=0)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    moderation: ModerationAppConfig = Field(default_factory=ModerationAppConfig)
    support: SupportAppConfig = Field(default_factory=SupportAppConfig)
    chat: ChatAppConfig = Field(default_factory=ChatAppConfig)
    feedback: FeedbackAppConfig = Field(default_factory=FeedbackAppConfig)
    advisor: AdvisorAppConfig = Field(default_factory=AdvisorAppConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)

    @property
    def url(self) -> str:
        """Where clients on this machine reach the applications."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{'https' if self.tls.enabled else 'http'}://{host}:{self.port}"
