"""A private local Ray head for `fleet up`, findable from other shells (no Ray import: subprocesses only).

`start_local_head` runs `ray start --head --block` in its own session, with token authentication on and its
files in a private directory (`mkdtemp`, mode 0700: Ray's --temp-dir and the head's log), so other programs'
`ray.init()` on this machine neither attach to it nor can join it without the token. It records the head in
a state file, ~/.cache/fleet/cluster.json (or $FLEET_STATE_DIR/cluster.json); `resolve_address(None)` and
`join_env()` read it back in every process that joins through the launcher. `stop_local_head` stops it:
SIGTERM to the `ray start` process, which stops its Ray processes.

The token: Ray 2.60 turns token authentication on for `ray start --head` but creates no token, so a fresh
machine (no ~/.ray/auth_token) could not start one. Unless the user supplies a token (RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH), the fleet keeps its own in the state directory (auth_token, mode 0600, made once) and
hands it to the head and every joining process as RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleet.durable import write_text_atomic
from fleet.validate import is_int

TEMP_PREFIX = "fleet-ray-"
TOKEN_NAME = "auth_token"


class LocalHeadError(RuntimeError):
    """The private head could not be started or its state file cannot be trusted; the message says why."""


# ---- the state directory and its files -----------------------------------------------------------
def state_dir() -> Path:
    return Path(os.environ.get("FLEET_STATE_DIR") or Path.home() / ".cache" / "fleet")


def state_file() -> Path:
    return state_dir() / "cluster.json"


def _private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing; a directory we create is 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def ensure_token() -> str | None:
    """The token file the private head runs with: None when the user supplies one (RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH, which Ray then reads itself), else the fleet's own, created on first use."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = _private_dir(state_dir()) / TOKEN_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        # 256 bits, as `ray get-auth-token --generate` makes; owner-only from the first byte
        write_text_atomic(path, secrets.token_hex(32), mode=0o600)
        return str(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise LocalHeadError(
            f"{path} must be a regular file owned by you with mode 0600 (it is the fleet's Ray token); "
            f"fix it with `chmod 600 {path}`, or remove it and a new one is made"
        )
    if not path.read_text().strip():
        raise LocalHeadError(f"{path} is empty; remove it and `fleet up` makes a new token")
    return str(path)


API_TOKEN_NAME = "api_token"


def ensure_api_token() -> str:
    """The token the fleet's network endpoints take (HTTP `Authorization: Bearer`, openpi `Api-Key`, metrics), made
    once in the state directory (api_token, mode 0600). Not the Ray token: a robot given this one can ask for
    actions and read metrics, never join the cluster and run code on it."""
    path = _private_dir(state_dir()) / API_TOKEN_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        write_text_atomic(path, secrets.token_urlsafe(32), mode=0o600)
        return path.read_text().strip()
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise LocalHeadError(
            f"{path} must be a regular file owned by you with mode 0600 (it is the fleet's endpoint token); "
            f"fix it with `chmod 600 {path}`, or remove it and a new one is made"
        )
    token = path.read_text().strip()
    if not token:
        raise LocalHeadError(f"{path} is empty; remove it and `fleet up` makes a new token")
    return token


# ---- the recorded head ---------------------------------------------------------------------------
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


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_our_head(pid: int, temp_dir: str) -> bool:
    """True when `pid` is a `ray start --head` process running with the --temp-dir we gave it."""
    cmd = _cmdline(pid)
    return "start" in cmd and "--head" in cmd and f"--temp-dir={temp_dir}" in cmd


def _valid_pid(value: object) -> bool:
    return is_int(value) and value > 1


def read_state() -> dict | None:
    """The private head `fleet up` started, if it still runs: {"address", "pid", "temp_dir", ...}.

    None when no head is recorded or the recorded one has exited. A state file that is malformed, or whose
    pid runs something other than the `ray start` we launched, raises LocalHeadError (it is never
    signalled): the message names the file to remove."""
    path = state_file()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LocalHeadError(f"{path}: unreadable ({exc.strerror})") from None
    try:
        state = json.loads(text)
    except ValueError:
        state = None
    ok = isinstance(state, dict) and _valid_pid(state.get("pid"))
    ok = ok and isinstance(state.get("address"), str) and isinstance(state.get("temp_dir"), str)
    if not ok:
        raise LocalHeadError(
            f"{path} is not a fleet head record (it needs a pid > 1, an address and a temp_dir); "
            "remove it if no fleet is running"
        )
    if not _pid_alive(state["pid"]):
        return None
    if not _is_our_head(state["pid"], state["temp_dir"]):
        raise LocalHeadError(
            f"{path} names pid {state['pid']}, which is not the `ray start --head` fleet launched "
            "(refusing to use or signal it); remove the file if no fleet is running"
        )
    return state


def resolve_address(address: str | None) -> str:
    """An explicit address, else the private head `fleet up` recorded, else "auto"."""
    if address:
        return address
    state = read_state()
    return state["address"] if state else "auto"


def join_env(state: dict) -> dict[str, str]:
    """Environment variables a process needs to join the recorded private head: token mode and the
    head's token file, unless the user set them (then their choice stands)."""
    env: dict[str, str] = {}
    if state.get("auth_mode") == "token" and not os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = "token"
    token = state.get("token_path")
    if token and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        env["RAY_AUTH_TOKEN_PATH"] = token
    return env


def cluster_join_env() -> dict[str, str]:
    """For a cluster started elsewhere (`--address`): token mode when RAY_AUTH_MODE is unset and a token is
    at hand where Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), as `ray start` itself
    decides. A token sent to a cluster without authentication is ignored; a cluster with it needs one."""
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        return {"RAY_AUTH_MODE": "token"}
    return {}


# ---- starting and stopping -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_temp_dir() -> Path:
    """A fresh 0700 directory with a short path: Ray's socket paths live under it (about 107 bytes max)."""
    base = tempfile.gettempdir()
    if len(base) > 24 and os.path.isdir("/tmp"):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=base))


# (pattern in the head's log, what to do about it): the first that matches is the hint
_HINTS = (
    (
        r"AuthenticationError",
        "the Ray token: set RAY_AUTH_TOKEN_PATH to a readable token file, or unset "
        "RAY_AUTH_TOKEN/RAY_AUTH_TOKEN_PATH so fleet uses its own",
    ),
    (
        r"[Aa]ddress already in use|already running at",
        "a port is taken: stop the other Ray (`fleet down` or `ray stop`) and try again",
    ),
    (r"object.?store|/dev/shm|plasma", "shared memory: lower --object-store-memory or free /dev/shm"),
    (r"No space left on device", "the disk is full: free space in /tmp"),
    (r"ModuleNotFoundError|ImportError", "the installation: run `pip install -e '.[test]'` in this environment"),
)


def explain_failure(log_text: str) -> tuple[str, str]:
    """(cause, fix) from a failed head's log: the last exception line of its traceback, and a hint."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^([A-Za-z_][\w.]*)?(Error|Exception|Exit)\b.*:", ln)]
    cause = (errors or lines or ["no output"])[-1]
    cause = re.sub(r"^(\w+\.)+(?=\w+(Error|Exception))", "", cause)  # ray.exceptions.X: -> X:
    cause = re.split(r"(?<=[.!])\s", cause, maxsplit=1)[0]  # its first sentence
    if len(cause) > 200:
        cause = cause[:197] + "..."
    for pattern, fix in _HINTS:
        if re.search(pattern, log_text):
            return cause, fix
    return cause, "see the log below"


def start_local_head(num_cpus: int, object_store_mb: int = 256, timeout_s: float = 90.0) -> dict:
    """`ray start --head --block` in its own session; returns its state (address, pid, temp_dir, ...)."""
    token_path = ensure_token()
    private = _private_temp_dir()
    temp_dir, log_path = str(private / "ray"), private / "head.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}"]
    cmd += [f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    # token authentication on, with the fleet's token unless the user supplied one; every process that
    # joins through the launcher gets the same two variables (join_env)
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    # `down` has stopped the robots and delivered their corrections before it stops the head: Ray's 30 s
    # drain on SIGTERM (meant for rolling upgrades behind a load balancer) would only delay it
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(log_fd, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address_file = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            _stop_process(proc.pid)
            text = log_path.read_text(errors="replace")
            cause, fix = explain_failure(text) if code is not None else (f"no address after {timeout_s:.0f} s", "")
            raise LocalHeadError(
                f"could not start a local Ray head: {cause}\n  fix: {fix or 'see the log'}; log: {log_path}"
            )
        time.sleep(0.2)
    state = {
        "address": address_file.read_text().strip(),
        "pid": proc.pid,
        "temp_dir": temp_dir,
        "private_dir": str(private),
        "log": str(log_path),
        "auth_mode": env["RAY_AUTH_MODE"],
        "token_path": token_path,
        "started_by": os.getpid(),
        "started_at": time.time(),
    }
    _private_dir(state_dir())
    write_text_atomic(state_file(), json.dumps(state), mode=0o600)
    return state


def _stop_process(pid: int, timeout_s: float = 45.0) -> None:
    """SIGTERM the `ray start --block` process (it drains and stops its Ray processes), SIGKILL its process
    group (it leads one: started with start_new_session) if it is still there after timeout_s."""
    if not _valid_pid(pid):
        return
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
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_local_head(state: dict | None = None) -> bool:
    """Stop the private head recorded in the state file (or `state`); True if one was stopped."""
    state = state or read_state()
    if not state:
        return False
    if _pid_alive(state["pid"]) and not _is_our_head(state["pid"], state["temp_dir"]):
        raise LocalHeadError(f"pid {state['pid']} is not the `ray start --head` fleet launched; not signalled")
    _stop_process(int(state["pid"]))
    state_file().unlink(missing_ok=True)
    private = state.get("private_dir")
    if private and Path(private).name.startswith(TEMP_PREFIX):
        shutil.rmtree(private, ignore_errors=True)
    return True
