"""A private local Ray head for `fleet up`, findable from other shells (no Ray import: subprocesses only).

`start_local_head` runs `ray start --head --block` in its own session with its own --temp-dir (so other
programs' `ray.init()` on this machine do not attach to it) and records its address in a state file,
~/.cache/fleet/cluster.json (or $FLEET_STATE_DIR/cluster.json); `resolve_address(None)` reads it back.
`stop_local_head` stops it: SIGTERM to the `ray start` process, which stops its Ray processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class LocalHeadError(RuntimeError):
    """The private head could not be started; the message carries the tail of its log."""


def state_file() -> Path:
    base = os.environ.get("FLEET_STATE_DIR") or Path.home() / ".cache" / "fleet"
    return Path(base) / "cluster.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_state() -> dict | None:
    """The private head `fleet up` started, if it still runs: {"address", "pid", "temp_dir", ...}."""
    try:
        state = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and _pid_alive(int(state.get("pid", -1))) else None


def resolve_address(address: str | None) -> str:
    """An explicit address, else the private head `fleet up` recorded, else "auto"."""
    if address:
        return address
    state = read_state()
    return state["address"] if state else "auto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_head(num_cpus: int, object_store_mb: int = 256, timeout_s: float = 90.0) -> dict:
    """`ray start --head --block` in its own session; returns its state (address, pid, temp_dir)."""
    port = _free_port()
    temp_dir = f"/tmp/fleet-ray-{port}"  # short: Ray's socket paths live under it
    log_path = Path(temp_dir + ".log")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}"]
    cmd += [f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    # Ray 2.60 turns token authentication on for a new head, but a client joining an explicit address only
    # uses it when RAY_AUTH_MODE says so: set it for the head and for every process that joins it through us
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
    # `down` has stopped the robots and delivered their corrections before it stops the head: Ray's 30 s
    # drain on SIGTERM (meant for rolling upgrades behind a load balancer) would only delay it
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address_file = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-1500:] if log_path.exists() else ""
            _stop_process(proc.pid)
            raise LocalHeadError(f"could not start a local Ray head (exit {proc.poll()}):\n{tail}")
        time.sleep(0.2)
    state = {
        "address": address_file.read_text().strip(),
        "pid": proc.pid,
        "temp_dir": temp_dir,
        "log": str(log_path),
        "auth_mode": env["RAY_AUTH_MODE"],
        "started_by": os.getpid(),
        "started_at": time.time(),
    }
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
    return state


def _stop_process(pid: int, timeout_s: float = 45.0) -> None:
    """SIGTERM the `ray start --block` process (it drains and stops its Ray processes), SIGKILL its group
    if it is still there after timeout_s."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (started by another `fleet up`): poll for it instead
            done = 0 if _pid_alive(pid) else pid
        if done:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_local_head(state: dict | None = None) -> bool:
    """Stop the private head recorded in the state file (or `state`); True if one was stopped."""
    state = state or read_state()
    if not state:
        return False
    _stop_process(int(state["pid"]))
    state_file().unlink(missing_ok=True)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    if state.get("log"):
        Path(state["log"]).unlink(missing_ok=True)
    return True
