"""The head registry: `fleet.learning.head_store.HeadStore` on Ray, one named actor per fleet.

    from actors.heads import get_head_registry
    registry = get_head_registry(persist_dir="runs/heads")
    v = ray.get(registry.publish.remote("franka", None, head_to_bytes(model, "franka"), {"loss": 0.1}))
    ray.get(registry.latest.remote())            # {"franka": v}

The learner publishes; every PolicyServer replica polls `latest()` and installs what is newer, so a
version reaches the whole fleet within a poll or two. Versions only ever increase: a rollback
re-publishes an earlier payload under a new number. With `persist_dir`, each version is written
(temporary name, fsync, rename) before `publish` returns, and a restarted actor reloads them. The logic
(validation, versions, persistence) is HeadStore's and is tested without Ray.
"""

from __future__ import annotations

import os

import ray

from fleet.learning.head_store import HeadStore
from fleet.names import HEADS

HEADS_NUM_CPUS = 0.05
# the registry only stores bytes: a sliver of a core leaves the CPUs to the robots and the policy

# calls run one at a time (a synchronous actor), which the store relies on; Ray restarts it forever and
# retries interrupted calls, and a retried publish of the same payload is answered, not refused
HeadRegistry = ray.remote(num_cpus=HEADS_NUM_CPUS, max_restarts=-1, max_task_retries=-1)(HeadStore)

DEFAULT_NAME = HEADS


def get_head_registry(
    name: str = DEFAULT_NAME,
    namespace: str | None = None,
    persist_dir: str | os.PathLike | None = None,
    *,
    detached: bool = False,
) -> ray.actor.ActorHandle:
    """The named registry actor: created if absent (persisting to `persist_dir`), else the running one.
    `detached` keeps it alive after this driver exits (the launcher's choice)."""
    options: dict = {"name": name, "get_if_exists": True}
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return HeadRegistry.options(**options).remote(str(persist_dir) if persist_dir else None)
