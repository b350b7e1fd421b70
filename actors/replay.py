"""The replay actor: `fleet.data.ReplayStore` on Ray, restarted by Ray and reloaded from its log.

    from actors.replay import start_replay_actor
    replay = start_replay_actor("runs/replay-log")
    ack = ray.get(replay.add.remote([correction.to_dict()]))   # {"accepted", "duplicates", "rejected"}

Ray retries a call that was in flight when the actor died (at-least-once); the store drops the repeat
by correction id and acknowledges it again, which is safe because the first attempt only returned
after the write was durable.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from fleet.data import ReplayStore
from fleet.names import REPLAY

REPLAY_NUM_CPUS = 0.1
# the store is I/O-bound: a tenth of a core leaves the CPUs to the robots and the policy


class _ReplayActor(ReplayStore):
    """ReplayStore plus the health check every long-lived actor answers.

    Calls run one at a time (Ray's default for a synchronous actor), which the store relies on: it is
    the log's only writer and is not thread-safe.
    """

    def check_health(self) -> bool:
        return True


ReplayActor = ray.remote(num_cpus=REPLAY_NUM_CPUS, max_restarts=-1, max_task_retries=-1)(_ReplayActor)


def start_replay_actor(
    log_dir: str | os.PathLike,
    capacity: int = 1000,
    name: str = REPLAY,
    namespace: str | None = None,
    *,
    detached: bool = False,
    **store_kwargs,
) -> ray.actor.ActorHandle:
    """Create the named replay actor, or return the running one if it already serves `log_dir`.

    Restarts forever and retries interrupted calls (max_restarts=-1, max_task_retries=-1). `detached`
    keeps it alive after the driver exits. Raises ValueError if an actor of that name serves another log.
    """
    options = {"name": name, "get_if_exists": True}
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    handle = ReplayActor.options(**options).remote(str(log_dir), capacity, **store_kwargs)
    served = ray.get(handle.log_dir.remote())
    wanted = str(Path(log_dir).resolve())
    if served != wanted:
        raise ValueError(f"replay actor {name!r} already serves {served}, not {wanted}; pick another name")
    return handle
