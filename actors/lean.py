"""Worker-process setup for robot actors: keep pyarrow out of them.

Every Ray worker builds a serialization context on its first task, and Ray's serialization add-ons
(`ray.util.serialization_addons` -> `ray._private.arrow_serialization`) import pyarrow there whenever it is
installed, to register Ray Data's Arrow serializers. pyarrow is a core dependency of this project (the
correction log is Parquet), so every robot actor paid about 55 MB RSS for libarrow, libparquet and friends
it never uses: a robot is numpy only and sends its corrections to the replay actor, which owns the Parquet.
Measured on a fresh install (Ray 2.60, pyarrow 26): a bare actor 85 MB, 163 MB after its first task;
the add-on skips itself on ModuleNotFoundError, so a robot's worker refuses the import from the start.

RobotActor's runtime_env (`ROBOT_RUNTIME_ENV`) runs `setup` when its worker process starts, before the first
task. Ray honours the `worker_process_setup_hook` field only in `ray.init`'s runtime_env; for one actor class
the hook goes in as the environment variable that `ray.init` itself sets for it (Ray 2.60's
`ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR`), which the worker reads at start-up.
"""

from __future__ import annotations

import sys


class _NoPyarrow:
    """A meta-path finder that refuses pyarrow (and only pyarrow) in this process."""

    def find_spec(self, name, path=None, target=None):  # noqa: ARG002 - the finder protocol
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ModuleNotFoundError(
                f"No module named {name!r}: robot actors run without pyarrow (actors/lean.py)", name=name
            )
        return None


def setup() -> None:
    """Refuse pyarrow imports in this worker from now on (idempotent)."""
    if not any(isinstance(f, _NoPyarrow) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPyarrow())


SETUP_HOOK = f"{__name__}.setup"


def _hook_env_var() -> str:
    try:
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR  # Ray's private name, if there

        return WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    except ImportError:  # the name in Ray 2.60
        return "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


ROBOT_RUNTIME_ENV = {"env_vars": {_hook_env_var(): SETUP_HOOK}}
