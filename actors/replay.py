"""The replay actor: `fleet.data.store.ReplayStore` on Ray, restarted by Ray and reloaded from its log.

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
from typing import Any

import ray

from fleet.names import REPLAY

REPLAY_NUM_CPUS = 0.1
# the store is I/O-bound: a tenth of a core leaves the CPUs to the robots and the policy


class _ReplayActor:
    """The ReplayStore's methods on Ray, plus the health check every long-lived actor answers.

    A thin adapter that builds the store in its constructor: every process that calls this actor loads
    this class (Ray reads the method signatures from it), robots included, and a robot's worker runs
    without pyarrow (actors/lean.py), which the store needs. Calls run one at a time (Ray's default for a
    synchronous actor), which the store relies on: it is the log's only writer and is not thread-safe.
    """

    def __init__(self, log_dir: str | os.PathLike, capacity: int = 1000, **store_kwargs: Any) -> None:
        from fleet.data.store import ReplayStore  # pyarrow: only in the replay actor's own process

        self.store = ReplayStore(log_dir, capacity, **store_kwargs)

    def add(self, corrections: list | dict) -> dict[str, list]:
        return self.store.add(corrections)

    def register_embodiment(self, spec: dict) -> list[str]:
        return self.store.register_embodiment(spec)

    def compact(self) -> int:
        return self.store.compact()

    def sample(
        self, embodiment: str, n: int, mode: str = "uniform", seed: int | None = None, half_life: float | None = None
    ) -> list:
        return self.store.sample(embodiment, n, mode, seed, half_life)

    def since(self, embodiment: str, cursor: int = 0) -> dict[str, Any]:
        return self.store.since(embodiment, cursor)

    def counts(self) -> dict[str, dict[str, int]]:
        return self.store.counts()

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def log_dir(self) -> str:
        return self.store.log_dir()

    def export(self, out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        return self.store.export(out_dir, **kwargs)

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
