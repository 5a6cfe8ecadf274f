"""Application builders (the `import_path`s of the Serve config) and the options of each model
deployment, derived from `ServeConfig`.

Every model reference is pinned to an exact version when an application is built or swapped, so
all replicas, including ones the autoscaler adds later, serve the same version even if the
registry alias moves meanwhile.
"""

from __future__ import annotations

from ray.serve import Application

from serve_apps.chat import ChatPipeline
from serve_apps.config import (
    ChatAppConfig,
    FeedbackAppConfig,
    ModelDeploymentConfig,
    ModerationAppConfig,
    OverloadConfig,
    SupportAppConfig,
)
from serve_apps.deployments import Classifier, Encoder, Generator
from serve_apps.feedback import FeedbackService
from serve_apps.model import resolve
from serve_apps.moderation import ModerationPipeline
from serve_apps.support import SupportPipeline


def pin(ref: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(`models:/NAME/VERSION` the reference points at now, the alias it was given by)."""
    identity = resolve(ref, tracking_uri)
    return identity.uri, identity.alias


def pinned_user_config(md: ModelDeploymentConfig, tracking_uri: str | None) -> dict:
    model, alias = pin(md.model, tracking_uri)
    canary = None
    if md.canary:
        ref, canary_alias = pin(md.canary.model, tracking_uri)
        canary = md.canary.model_copy(update={"model": ref, "alias": canary_alias})
    return md.user_config(model, alias, canary)


def actor_resources(md: ModelDeploymentConfig, use_gpu: bool, gpu_resource: str | None) -> dict:
    """`ray_actor_options` of one replica: on GPUs also `gpu_resource` (the serving GPU node
    type's own resource), as much as its GPU share."""
    gpus = md.resources.num_gpus if use_gpu else 0
    actor: dict = {"num_cpus": md.resources.num_cpus, "num_gpus": gpus}
    if gpus and gpu_resource:
        actor["resources"] = {gpu_resource: gpus}
    if md.resources.memory_mb:
        actor["memory"] = md.resources.memory_mb * 2**20
    return actor


def deployment_options(md: ModelDeploymentConfig, use_gpu: bool, tracking_uri: str | None,
                       gpu_resource: str | None = None, pin_models: bool = True) -> dict:
    """`.options()` of a model deployment, in the field names of Serve's config file. With
    `pin_models` every reference is pinned to its version now (the registry is asked); without,
    each replica resolves its alias when it starts (a manifest written before any deploy)."""
    user_config = pinned_user_config(md, tracking_uri) if pin_models else \
        md.user_config(md.model, None, md.canary)
    return {"user_config": user_config,
            "autoscaling_config": md.autoscaling.model_dump(exclude_none=True),
            "ray_actor_options": actor_resources(md, use_gpu, gpu_resource),
            "max_ongoing_requests": max(md.max_ongoing_requests, md.batching.max_batch_size)}


def ingress_options(overload: OverloadConfig, cpus: float) -> dict:
    """`.options()` of an application's ingress, in the field names of Serve's config file:
    Serve sheds load past `max_queued_requests` with 503 and `Retry-After`."""
    return {"ray_actor_options": {"num_cpus": cpus},
            "max_ongoing_requests": overload.max_ongoing_requests,
            "max_queued_requests": overload.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": overload.retry_after_s}}


def _ingress(cfg, args: dict) -> dict:
    return ingress_options(cfg.overload, args["ingress_cpus"])


def _model(deployment, md: ModelDeploymentConfig, args: dict):
    uri = args["tracking_uri"]
    return deployment.options(**deployment_options(
        md, args["use_gpu"], uri, args.get("gpu_resource"))).bind(uri)


def moderation(args: dict) -> Application:
    """args: config (ModerationAppConfig), limits, tracking_uri, use_gpu, gpu_resource,
    ingress_cpus, log
    (the inference log's uri and LogConfig; absent: no log) and governance (what the policies
    need, `serve_apps.policies.chain`; absent: no policies)."""
    cfg = ModerationAppConfig.model_validate(args["config"])
    return ModerationPipeline.options(**_ingress(cfg, args)).bind(
        _model(Classifier, cfg.classifier, args), _model(Generator, cfg.generator, args),
        args["config"], args["limits"], args.get("log"), args.get("governance"))


def support(args: dict) -> Application:
    cfg = SupportAppConfig.model_validate(args["config"])
    return SupportPipeline.options(**_ingress(cfg, args)).bind(
        _model(Classifier, cfg.classifier, args), _model(Encoder, cfg.encoder, args),
        _model(Generator, cfg.generator, args), args["config"], args["limits"], args["tracking_uri"],
        args.get("log"), args.get("governance"))


def chat(args: dict) -> Application:
    cfg = ChatAppConfig.model_validate(args["config"])
    return ChatPipeline.options(**_ingress(cfg, args)).bind(
        _model(Generator, cfg.generator, args), args["config"], args["limits"], args.get("log"),
        args.get("governance"))


def feedback(args: dict) -> Application:
    cfg = FeedbackAppConfig.model_validate(args["config"])
    return FeedbackService.options(**_ingress(cfg, args)).bind(
        args["log"], args["tracking_uri"], args["config"], args.get("governance"))


# application name -> (builder, the model deployments it holds, by config field)
APPS = {
    "moderation": (moderation, {"Classifier": "classifier", "Generator": "generator"},
                   "ModerationPipeline"),
    "support": (support, {"Classifier": "classifier", "Encoder": "encoder",
                          "Generator": "generator"}, "SupportPipeline"),
    "chat": (chat, {"Generator": "generator"}, "ChatPipeline"),
    "feedback": (feedback, {}, "FeedbackService"),
}
