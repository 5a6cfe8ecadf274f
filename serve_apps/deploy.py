"""Serve config generation, deployment, status, hot swap and canary: all through Ray Serve's own
config format and REST API (what `serve deploy` / `serve status` use), so the two agree.

Hot swap and canary edit only the `user_config` of the affected deployments and deploy the whole
config again; Serve then calls `reconfigure()` on every running replica (no restart). The
changed config is also what `serve status` / `serve config` show.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serve_apps.config import ServeConfig
from serve_apps.model_config import CanaryConfig
from training.errors import LLMOpsError
from training.refs import UnknownModel, model_name, pin, reference, resolve


class DeployFailed(LLMOpsError):
    """Serve could not bring an application up (its message says why)."""

    exit_code = 5


def serve_config(config: ServeConfig, tracking_uri: str | None, use_gpu: bool,
                 env_vars: dict[str, str], log: dict | None = None,
                 governance: dict | None = None, pin_models: bool = True,
                 logging: dict | None = None) -> dict:
    """The Serve config (`ServeDeploySchema`) of every enabled application; `log` is where and
    how pipelines write the inference log (`{"uri": ..., **LogConfig}`), None for no log;
    `governance` what the policies need (`serve_apps.policies.chain`), None for none;
    `pin_models` as in `serve_apps.apps.pinned_user_config` (False for a manifest written
    offline); `logging` Serve's `logging_config` (`LoggingSettings.serve()`), None for
    Serve's default."""
    from serve_apps.apps import APPS, app_deployments, pipeline_config  # not for status

    apps = []
    for name in APPS:
        app_cfg = getattr(config, name)
        if not app_cfg.enabled or (name == "feedback" and log is None):
            continue
        args = {"config": pipeline_config(app_cfg), "limits": config.limits.model_dump(),
                "tracking_uri": tracking_uri, "use_gpu": use_gpu,
                "gpu_resource": config.gpu_resource, "ingress_cpus": config.ingress_cpus,
                "log": log, "governance": governance}
        deployments = [{"name": dep, **options} for dep, options in app_deployments(
            name, app_cfg, config.ingress_cpus, use_gpu, tracking_uri, config.gpu_resource,
            pin_models).items()]
        apps.append({"name": name, "route_prefix": app_cfg.route_prefix,
                     "import_path": f"serve_apps.apps:{name}", "args": args,
                     "runtime_env": {"env_vars": env_vars}, "deployments": deployments,
                     **({"logging_config": logging} if logging else {})})
    from serve_apps.tls import http_options

    return {"proxy_location": "HeadOnly", "http_options": http_options(config),
            **({"logging_config": logging} if logging else {}), "applications": apps}


class ServeCluster:
    """The Serve instance of one Ray cluster, reached through its dashboard's REST API."""

    def __init__(self, dashboard_address: str):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        url = dashboard_address if "://" in dashboard_address else f"http://{dashboard_address}"
        self.client = ServeSubmissionClient(url)

    def details(self) -> dict:
        return self.client.get_serve_details()

    def deployed_config(self) -> dict:
        """The config Serve is running now (what `serve config` prints), as one document."""
        d = self.details()
        http = d.get("http_options") or {}
        return {"proxy_location": d.get("proxy_location") or "HeadOnly",
                "http_options": {k: v for k, v in http.items() if v is not None and k in (
                    "host", "port", "ssl_certfile", "ssl_keyfile")},
                "applications": [a["deployed_app_config"] for a in d["applications"].values()
                                 if a.get("deployed_app_config")]}

    def deploy(self, config: dict, timeout_s: float = 300) -> float:
        """Apply `config` and wait until every application runs it; seconds it took."""
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(config)
        started = time.perf_counter()
        self.client.deploy_applications(config)
        self.wait(config, timeout_s)
        return time.perf_counter() - started

    def wait(self, config: dict, timeout_s: float) -> None:
        """Until each application is RUNNING with every deployment HEALTHY on the target
        `user_config` (so a swap has reached every replica)."""
        deadline = time.monotonic() + timeout_s
        while True:
            problems = self._pending(config)
            if not problems:
                return
            failed = [p for p in problems if "FAILED" in p]
            if failed or time.monotonic() > deadline:
                raise DeployFailed("; ".join(failed or problems)[:500])
            time.sleep(0.25)

    def _pending(self, config: dict) -> list[str]:
        apps = self.details()["applications"]
        pending = []
        for app in config["applications"]:
            state = apps.get(app["name"])
            if state is None or state["status"] != "RUNNING":
                status = state["status"] if state else "NOT_STARTED"
                message = (state or {}).get("message", "")
                pending.append(f"{app['name']}: {status} {message}".strip())
                continue
            for dep in app.get("deployments", []):
                live = state["deployments"].get(dep["name"], {})
                target = dep.get("user_config")
                running = live.get("deployment_config", {}).get("user_config")
                if live.get("status") != "HEALTHY" or (target is not None and running != target):
                    pending.append(f"{app['name']}/{dep['name']}: {live.get('status')}")
        return pending

    def shutdown(self) -> None:
        self.client.delete_applications()

    def status(self) -> dict:
        """Applications, deployments, replica states and the model versions in service."""
        out = {}
        for name, app in self.details()["applications"].items():
            deps = {}
            for dname, dep in app["deployments"].items():
                replicas: dict[str, int] = {}
                for r in dep.get("replicas", []):
                    replicas[r["state"]] = replicas.get(r["state"], 0) + 1
                state = {"status": dep["status"], "replicas": replicas}
                stages = _stages(dname, dep.get("deployment_config", {}).get("user_config"))
                deps[dname] = {**state, "model": None, "alias": None, "canary": None}
                for stage, uc in stages.items():  # an inline model is listed by its pipeline
                    deps[stage] = {**state, "model": uc.get("model"), "alias": uc.get("alias"),
                                   "canary": uc.get("canary"),
                                   **({"adapters": uc["adapters"]} if uc.get("adapters") else {}),
                                   **({"adapter_canaries": uc["adapter_canaries"]}
                                      if uc.get("adapter_canaries") else {}),
                                   **({"fallback": uc["fallback"]} if uc.get("fallback") else {}),
                                   **({"inline_in": dname} if stage != dname else {})}
            out[name] = {"status": app["status"], "route_prefix": app.get("route_prefix"),
                         "deployments": deps}
        return out

    def update_models(self, model: str, change: Callable[[dict], dict],
                      timeout_s: float = 300) -> dict:
        """Apply `change` to the user_config of every deployment serving `model` (as its model
        or as one of its adapters), redeploy, wait until every replica serves it. Returns which
        deployments changed and how long."""
        config = self.deployed_config()
        changed = []
        for app in config["applications"]:
            for dep in app.get("deployments", []):
                for stage, uc in _stages(dep["name"], dep.get("user_config")).items():
                    if model in _served(uc):
                        uc.update(change(uc))  # in place: inline ones sit in their pipeline's
                        changed.append(f"{app['name']}/{stage}")
        if not changed:
            raise UnknownModel(f"no running deployment serves model {model!r}")
        seconds = self.deploy(config, timeout_s)
        return {"model": model, "deployments": changed, "seconds": round(seconds, 2)}


def _served(user_config: dict) -> set[str]:
    """The registered models a model deployment's user_config serves: its own and its
    adapters'."""
    return {model_name(user_config["model"])} | {
        model_name(a["model"]) for a in (user_config.get("adapters") or {}).values()}


def _stages(deployment: str, user_config: dict | None) -> dict[str, dict]:
    """The model user_configs a deployment holds, by model deployment name: its own (a model
    replica) or its inline models' (a pipeline, `serve_apps/stages.py`)."""
    user_config = user_config or {}
    if "models" in user_config:
        return user_config["models"]
    return {deployment: user_config} if "model" in user_config else {}


def swap(cluster: ServeCluster, model: str, tracking_uri: str | None, *, version: int | None = None,
         alias: str | None = None) -> dict:
    """Every deployment serving `model` switches to `version` (or what `alias` points at now):
    as its model, or as an adapter, whose base must stay the one it was trained on (a base
    swap that would leave an adapter on another base is refused, `BaseMismatch`)."""
    from serve_apps.adapters import as_config, pin_adapters

    ref, pinned_alias = pin(reference(model, version, alias), tracking_uri)

    def change(uc: dict) -> dict:
        out = dict(uc)
        if model_name(uc["model"]) == model:
            canary = uc.get("canary")
            if canary and resolve(canary["model"], tracking_uri).uri == ref:
                canary = None  # the challenger became the model itself
            out.update(model=ref, alias=pinned_alias, canary=canary)
        if uc.get("adapters"):
            adapters = {name: {"model": ref, "alias": pinned_alias}
                        if model_name(a["model"]) == model else a
                        for name, a in uc["adapters"].items()}
            out["adapters"] = as_config(pin_adapters(adapters, out["model"], tracking_uri))
            # an adapter whose challenger became the adapter itself ends its canary
            out["adapter_canaries"] = {name: c for name, c in
                                       (uc.get("adapter_canaries") or {}).items()
                                       if resolve(c["model"], tracking_uri).uri
                                       != out["adapters"][name]["model"]}
        return out

    return {**cluster.update_models(model, change), "serving": ref}


def repin_fallback(cluster: ServeCluster, model: str, tracking_uri: str | None) -> dict:
    """Every deployment of `model` with a peak fallback pinned from an alias serves the version
    that alias names now (a re-distilled student, `training/distill.py`)."""
    def change(uc: dict) -> dict:
        fallback = uc.get("fallback")
        if not fallback or not fallback.get("alias"):
            return uc
        ref, alias = pin(reference(model_name(fallback["model"]), alias=fallback["alias"]),
                         tracking_uri)
        return {**uc, "fallback": {**fallback, "model": ref, "alias": alias}}

    return cluster.update_models(model, change)


def set_priors(cluster: ServeCluster, model: str, version: int,
               weights: dict[str, float] | None) -> dict:
    """Adjust the answers of `model`'s `version` to new class priors (`weights`: `{label: new
    prior / training prior}`, `training/priors.py`) in every deployment serving it; None
    serves the posteriors as trained. Other versions (a canary's) are left as they are."""
    body = {"version": str(version), "weights": weights} if weights else None
    return cluster.update_models(model, lambda uc: {**uc, "priors": body})


def set_canary(cluster: ServeCluster, model: str, tracking_uri: str | None,
               canary: CanaryConfig | None) -> dict:
    """Serve `canary` (a challenger version with a traffic fraction, or shadow) beside the
    champion of every deployment of `model`; None ends the canary."""
    if canary is not None:
        ref, alias = pin(canary.model, tracking_uri)
        if model_name(ref) != model:
            raise LLMOpsError(f"the canary {canary.model} is not a version of {model}")
        canary = canary.model_copy(update={"model": ref, "alias": alias})
    body = canary.model_dump() if canary else None

    def change(uc: dict) -> dict:
        if model_name(uc["model"]) == model:
            return {**uc, "canary": body}
        return {**uc, "adapter_canaries": adapter_canaries(uc, model, body, tracking_uri)}

    return cluster.update_models(model, change)


def adapter_canaries(uc: dict, model: str, canary: dict | None, tracking_uri: str | None
                     ) -> dict[str, dict]:
    """A generator's adapter canaries with `canary` (None: none) for each adapter name that
    serves `model`, after checking its challenger was trained on the served base. A request
    for an adapter is answered by one version or the other, so its canary splits request ids;
    a shadow would generate every answer twice for a comparison no reviewer reads."""
    from serve_apps.adapters import pin_adapters

    names = [name for name, a in uc["adapters"].items() if model_name(a["model"]) == model]
    out = {k: v for k, v in (uc.get("adapter_canaries") or {}).items() if k not in names}
    if canary is None:
        return out
    if canary["shadow"]:
        raise LLMOpsError(f"{model} is served as a LoRA adapter: its canary splits requests "
                          f"(`fraction`), it cannot shadow them")
    pin_adapters(dict.fromkeys(names, canary["model"]), uc["model"], tracking_uri)
    return out | dict.fromkeys(names, canary)
