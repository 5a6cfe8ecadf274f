"""The cluster-wide singletons (the audit logger, the quota authority, the closed-loop
controllers): one named, detached Ray actor each, found or started by name, so every replica and
command reaches the same one, and restarted by Ray if its process dies. They keep their state in
files of the data dir, so on a cluster of several nodes they run on the head node, where that
folder is (and where `llmops` commands run)."""

from __future__ import annotations

import hashlib

NAMESPACE = "llmops"
# A resource only the head node has (Ray's own); a sliver of it pins an actor there.
HEAD_NODE = "node:__internal_head__"


def keyed(name: str, key: str) -> str:
    """`name` made unique to `key` (a folder, a file): one writer per store, also when several
    platforms share a Ray cluster."""
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def singleton(cls, name: str, *args, retry_calls: bool = True):
    """The actor `name` of the connected cluster, started from `cls(*args)` if absent. With
    `retry_calls`, a call cut off by a crash is run again on the restarted actor."""
    import ray

    return ray.remote(cls).options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources={HEAD_NODE: 0.001}, max_restarts=-1,
        max_task_retries=-1 if retry_calls else 0).remote(*args)
