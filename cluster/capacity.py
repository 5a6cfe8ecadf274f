"""Whether a cluster's node types can hold what the platform asks for.

The autoscaler launches a node type only for demand that fits it; a replica or fine-tune worker
that fits no type waits forever (Serve reports it as pending, not failed). `llmops cluster check`
and the tests compare every request of the serve and training settings with the node types of a
`ray up` config before anything is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.runtime import wants_gpu
from cluster.settings import Settings
from training.errors import LLMOpsError


class Unplaceable(LLMOpsError):
    """Some request of the platform fits no node type of the cluster."""


@dataclass(frozen=True)
class Request:
    """What one actor asks for, `count` times (replicas at most, or fine-tune workers)."""

    who: str
    resources: dict[str, float]
    count: int = 1


def node_types(cluster_config: dict) -> dict[str, dict]:
    """Node type -> {resources, max_workers} of a `ray up` config."""
    types = cluster_config.get("available_node_types") or {}
    head = cluster_config.get("head_node_type")
    return {name: {"resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
                   "max_workers": 1 if name == head else t.get("max_workers",
                                                               cluster_config.get("max_workers", 0))}
            for name, t in types.items()}


def load_cluster_config(path: str | Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LLMOpsError(f"cannot read cluster config {path}: {exc}") from exc


def uses_gpu(choice: str, types: dict[str, dict]) -> bool:
    """`wants_gpu` against the node types: `auto` counts as GPUs when some type has them (what
    the platform would see once the autoscaler brings one)."""
    return wants_gpu(choice, max((t["resources"].get("GPU", 0) for t in types.values()),
                                 default=0))


def requests(settings: Settings, types: dict[str, dict]) -> list[Request]:
    """Every request the platform makes under `settings`: each deployment's replicas (at their
    maximum count), each application's ingress, the fine-tune and retrain workers."""
    from serve_apps.deploy import serve_config

    out = []
    config = serve_config(settings.serve, settings.registry.tracking_uri,
                          uses_gpu(settings.serve.use_gpu, types), {}, settings.log_settings(),
                          None, pin_models=False)
    for app in config["applications"]:
        for dep in app["deployments"]:
            actor = dep["ray_actor_options"]
            asked = {"CPU": actor.get("num_cpus", 0), "GPU": actor.get("num_gpus", 0),
                     **actor.get("resources", {})}
            scaling = dep.get("autoscaling_config") or {}
            out.append(Request(f"serve {app['name']}/{dep['name']}",
                               {k: v for k, v in asked.items() if v},
                               scaling.get("max_replicas", dep.get("num_replicas", 1))))
    use_gpu = uses_gpu(settings.training.use_gpu, types)
    out.append(Request("train worker", settings.training.worker_resources(use_gpu),
                       settings.training.workers))
    retrain = settings.training.model_copy(
        update={"cpus_per_worker": settings.controller.retrain_cpus_per_worker})
    out.append(Request("retrain worker", retrain.worker_resources(use_gpu),
                       settings.controller.retrain_workers))
    return out


def fitting(request: Request, types: dict[str, dict]) -> list[str]:
    """The node types one actor of `request` fits on."""
    return [name for name, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in request.resources.items())]


def placements(settings: Settings, cluster_config: dict) -> list[dict]:
    """Per request: the node types one such actor fits on, and whether all `count` of them fit
    in those types at their `max_workers` (a fine-tune's workers run at the same time)."""
    types = node_types(cluster_config)
    rows = []
    for r in requests(settings, types):
        where = fitting(r, types)
        room = sum(int(min(types[n]["resources"].get(k, 0) / v for k, v in r.resources.items()))
                   * types[n]["max_workers"] for n in where) if r.resources else r.count
        rows.append({"who": r.who, "resources": r.resources, "count": r.count,
                     "node_types": where, "fits": bool(where) and room >= r.count})
    return rows


def check(settings: Settings, cluster_config: dict) -> list[dict]:
    """`placements`, raising `Unplaceable` naming each request that cannot be placed."""
    rows = placements(settings, cluster_config)
    bad = [f"{r['who']} {r['resources']} x{r['count']}" for r in rows if not r["fits"]]
    if bad:
        raise Unplaceable("no node type can hold: " + "; ".join(bad))
    return rows
