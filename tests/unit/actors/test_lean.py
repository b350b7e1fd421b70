"""Robot actors' worker processes keep pyarrow out (actors/lean.py); checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from actors.lean import ROBOT_RUNTIME_ENV, SETUP_HOOK


def test_setup_refuses_pyarrow_and_nothing_else():
    code = (
        "from actors.lean import setup\n"
        "setup(); setup()\n"
        "import numpy, json\n"
        "try:\n"
        "    import pyarrow.parquet\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('refused', exc.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["refused", "pyarrow"]


def test_the_robot_runtime_env_runs_the_hook_at_worker_start():
    from ray._private import ray_constants

    assert ROBOT_RUNTIME_ENV == {"env_vars": {ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: SETUP_HOOK}}
    module, name = SETUP_HOOK.rsplit(".", 1)
    assert callable(getattr(__import__(module, fromlist=[name]), name))


def test_every_actor_a_robot_calls_loads_in_a_robot_worker():
    """A robot holding a handle loads the actor's class to read its method signatures; a class whose module
    needs pyarrow would get Ray's fallback signature and every call would fail ("too many positional
    arguments": the replay actor did, and robots delivered no corrections)."""
    modules = ["actors.replay", "actors.learner", "actors.heads", "actors.robot", "actors.robot_io"]
    code = "from actors.lean import setup\nsetup()\nimport sys\n"
    code += "".join(f"import {m}\n" for m in modules)
    code += "print('pyarrow' in sys.modules, 'torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
