"""Application builders (the `import_path`s of the Serve config) and the options of each
deployment, derived from `ServeConfig`: a pipeline, and each of its models either inline in the
pipeline's replica or a deployment of its own (`placement`, `serve_apps/stages.py`).

Every model reference is pinned to an exact version when an application is built or swapped, so
all replicas, including ones the autoscaler adds later, serve the same version even if the
registry alias moves meanwhile.

Pipelines are imported only when their application is built: Serve builds each application in
a process of its own, and a service over no model (feedback) never loads torch.
"""

from __future__ import annotations

import importlib

from ray.serve import Application

from serve_apps.adapters import as_config, pin_adapters
from serve_apps.config import (
    AdvisorAppConfig,
    ChatAppConfig,
    FeedbackAppConfig,
    ModerationAppConfig,
    OverloadConfig,
    SupportAppConfig,
)
from serve_apps.model_config import ModelDeploymentConfig
from training.refs import pin, recorded_priors


def pinned_user_config(md: ModelDeploymentConfig, tracking_uri: str | None,
                       pin_models: bool = True) -> dict:
    """What a model's `reconfigure()` receives. With `pin_models` every reference is pinned
    to its version now (the registry is asked), each adapter is checked against the base, and
    the class priors the loop recorded for the pinned version are applied again;
    without, each replica resolves its aliases when it starts (a manifest written before any
    deploy)."""
    if not pin_models:
        return md.user_config(md.model, None, md.canary, {
            name: {"model": ref, "alias": None} for name, ref in md.adapters.items()},
            md.fallback)
    model, alias = pin(md.model, tracking_uri)
    canary, fallback = (None if stage is None else stage.model_copy(update=dict(zip(
        ("model", "alias"), pin(stage.model, tracking_uri)))) for stage in (md.canary, md.fallback))
    config = md.user_config(model, alias, canary,
                            as_config(pin_adapters(md.adapters, model, tracking_uri)), fallback)
    priors = recorded_priors(model, tracking_uri)  # what the loop set after a label shift
    return {**config, "priors": priors} if priors else config


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
    """`.options()` of a model deployment, in the field names of Serve's config file
    (`pin_models` as in `pinned_user_config`)."""
    return {"user_config": pinned_user_config(md, tracking_uri, pin_models),
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


def app_deployments(name: str, app_cfg, ingress_cpus: float, use_gpu: bool,
                    tracking_uri: str | None, gpu_resource: str | None = None,
                    pin_models: bool = True) -> dict[str, dict]:
    """The `.options()` of every Serve deployment of application `name`, by deployment name:
    its pipeline (with the user_config and resources of its inline models, `stages`) and
    each model with a replica of its own."""
    pipeline, models = APPS[name]
    ingress = ingress_options(app_cfg.overload, app_cfg.ingress_cpus or ingress_cpus)
    pipeline_name = pipeline.rsplit(":", 1)[1]  # the deployment's name: its class's
    out, inline = {}, {}
    for dep, field in models.items():
        md: ModelDeploymentConfig | None = getattr(app_cfg, field)
        if md is None:  # an optional stage not configured (the advisor's assistant)
            continue
        if not md.inline(use_gpu, generates=dep == "Generator"):
            out[dep] = deployment_options(md, use_gpu, tracking_uri, gpu_resource, pin_models)
            continue
        inline[dep] = pinned_user_config(md, tracking_uri, pin_models)
        actor = ingress["ray_actor_options"]
        actor["num_cpus"] = round(actor["num_cpus"] + md.resources.num_cpus, 4)
        if md.resources.memory_mb:
            actor["memory"] = actor.get("memory", 0) + md.resources.memory_mb * 2**20
    live = {}  # what the pipeline's `reconfigure` changes in place (`pipeline_config`)
    if {"Classifier", "Generator"} & set(models):
        switch = app_cfg.peak_switch()
        live["pressure"] = switch and switch.model_dump(mode="json")
    if "breaker" in type(app_cfg).model_fields:
        live["breaker"] = app_cfg.breaker.model_dump(mode="json")
    if inline:
        live["models"] = inline
    if live:
        ingress["user_config"] = live
    if app_cfg.autoscaling is not None:
        ingress["autoscaling_config"] = app_cfg.autoscaling.model_dump(exclude_none=True)
    return {pipeline_name: ingress, **out}


def pipeline_config(app_cfg) -> dict:
    """The application's settings its pipeline is built with (its `args`): without those that
    change in place, which its deployments' options hold (`app_deployments`): the overload
    limits, the peak fallbacks (the switch's thresholds, the students) and the generator's
    breaker. Serve replaces every replica of an application whose args change, and none for a
    user_config or those limits."""
    return app_cfg.model_dump(mode="json", exclude={"overload": True, "breaker": True,
                                                    "classifier": {"fallback"},
                                                    "generator": {"fallback"}})


def _pipeline(name: str, args: dict) -> Application:
    """args: config (the application's config), limits, tracking_uri, use_gpu, gpu_resource,
    ingress_cpus, log (the inference log's uri and LogConfig; absent: no log) and governance
    (what the policies need, `serve_apps.policies.chain`; absent: no policies)."""
    path, models = APPS[name]
    module, class_name = path.rsplit(":", 1)
    pipeline = getattr(importlib.import_module(module), class_name)
    uri = args["tracking_uri"]
    options = app_deployments(name, CONFIGS[name].model_validate(args["config"]),
                              args["ingress_cpus"], args["use_gpu"], uri, args.get("gpu_resource"))
    if not models:  # a service over no model: feedback
        return pipeline.options(**options[class_name]).bind(
            args["log"], uri, args["config"], args.get("governance"))
    from serve_apps.stages import model_deployments

    deployments = model_deployments()
    stages = [deployments[dep].options(**options[dep]).bind(uri) if dep in options else None
              for dep in models]
    return pipeline.options(**options[class_name]).bind(
        *stages, args["config"], args["limits"], uri, args.get("log"), args.get("governance"))


def moderation(args: dict) -> Application:
    return _pipeline("moderation", args)


def support(args: dict) -> Application:
    return _pipeline("support", args)


def chat(args: dict) -> Application:
    return _pipeline("chat", args)


def feedback(args: dict) -> Application:
    return _pipeline("feedback", args)


def advisor(args: dict) -> Application:
    return _pipeline("advisor", args)


# application name -> (its pipeline deployment as module:class, its model stages: deployment
# name -> config field)
APPS = {
    "moderation": ("serve_apps.moderation:ModerationPipeline",
                   {"Classifier": "classifier", "Generator": "generator"}),
    "support": ("serve_apps.support:SupportPipeline",
                {"Classifier": "classifier", "Encoder": "encoder", "Generator": "generator"}),
    "chat": ("serve_apps.chat:ChatPipeline", {"Generator": "generator"}),
    "feedback": ("serve_apps.feedback:FeedbackService", {}),
    "advisor": ("serve_apps.advisor:AdvisorPipeline",
                {"Classifier": "classifier", "Generator": "assistant"}),
}
CONFIGS = {"moderation": ModerationAppConfig, "support": SupportAppConfig, "chat": ChatAppConfig,
           "feedback": FeedbackAppConfig, "advisor": AdvisorAppConfig}
