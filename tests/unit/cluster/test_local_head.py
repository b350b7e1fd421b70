"""The private local head's files, token and state record (fleet.cluster.local_head), without starting Ray."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from fleet.cluster import local_head
from fleet.cluster.local_head import LocalHeadError

AUTH_LOG = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/ray/scripts/scripts.py", line 1072, in start
    ensure_token_if_auth_enabled(system_config, create_token_if_missing=False)
ray.exceptions.AuthenticationError: Token authentication is enabled but no authentication token was found. \
Ensure that the token for the cluster is available in a local file (e.g., ~/.ray/auth_token).
"""


@pytest.fixture
def state(tmp_path, monkeypatch):
    """An empty state directory, and no token or auth mode from the environment."""
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_fleet_makes_its_own_owner_only_token_once(state):
    path = local_head.ensure_token()
    assert path == str(state / "auth_token")
    token = (state / "auth_token").read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex
    assert mode(path) == 0o600 and mode(state) == 0o700
    assert local_head.ensure_token() == path and (state / "auth_token").read_text() == token  # kept, not remade
    assert [p.name for p in state.iterdir()] == ["auth_token"]  # no temporary file left behind


def test_a_token_the_user_supplies_wins(state, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "theirs")
    assert local_head.ensure_token() is None and not state.exists()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/somewhere/token")
    assert local_head.ensure_token() is None


def test_a_token_others_can_read_or_a_link_is_refused(state, tmp_path):
    state.mkdir(mode=0o700)
    token = state / "auth_token"
    token.write_text("x" * 64)
    token.chmod(0o644)
    with pytest.raises(LocalHeadError, match="chmod 600"):
        local_head.ensure_token()
    token.unlink()
    (tmp_path / "elsewhere").write_text("y" * 64)
    token.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocalHeadError, match="regular file"):
        local_head.ensure_token()


def test_join_env_hands_the_head_token_to_joiners_unless_the_user_chose(state, monkeypatch):
    recorded = {"auth_mode": "token", "token_path": "/s/auth_token"}
    assert local_head.join_env(recorded) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/s/auth_token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "theirs")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert local_head.join_env(recorded) == {}


def test_the_private_temp_dir_is_owner_only_and_short():
    path = local_head._private_temp_dir()
    try:
        assert mode(path) == 0o700 and path.name.startswith(local_head.TEMP_PREFIX)
        assert len(str(path)) < 40  # Ray's socket paths (about 107 bytes at most) live under it
    finally:
        path.rmdir()


def write_state(state, record) -> None:
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "cluster.json").write_text(json.dumps(record) if not isinstance(record, str) else record)


@pytest.mark.parametrize("pid", [0, -1, 1, True, "123", None, 2.5])
def test_a_state_file_without_a_usable_pid_is_refused(state, pid):
    write_state(state, {"address": "127.0.0.1:1", "pid": pid, "temp_dir": "/tmp/fleet-ray-x/ray"})
    with pytest.raises(LocalHeadError, match="not a fleet head record"):
        local_head.read_state()
    with pytest.raises(LocalHeadError):
        local_head.resolve_address(None)


def test_a_malformed_state_file_is_refused(state):
    write_state(state, "{not json")
    with pytest.raises(LocalHeadError, match="remove it"):
        local_head.read_state()


def test_no_state_or_an_exited_head_reads_as_none(state):
    assert local_head.read_state() is None and local_head.resolve_address(None) == "auto"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_state(state, {"address": "127.0.0.1:1", "pid": int(done.stdout), "temp_dir": "/tmp/fleet-ray-x/ray"})
    assert local_head.read_state() is None
    assert local_head.resolve_address("10.0.0.5:6379") == "10.0.0.5:6379"  # an explicit address never reads it


def test_a_live_process_that_is_not_our_head_is_never_signalled(state):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"address": "127.0.0.1:1", "pid": other.pid, "temp_dir": "/tmp/fleet-ray-x/ray"}
        write_state(state, record)
        with pytest.raises(LocalHeadError, match=f"pid {other.pid}.*not the `ray start --head`"):
            local_head.read_state()
        with pytest.raises(LocalHeadError, match="not signalled"):
            local_head.stop_local_head(record)
        assert other.poll() is None  # still running: nothing was sent to it
        assert (state / "cluster.json").exists()
    finally:
        other.kill()
        other.wait()


def test_a_failed_start_is_explained_in_two_lines():
    cause, fix = local_head.explain_failure(AUTH_LOG)
    assert cause == "AuthenticationError: Token authentication is enabled but no authentication token was found."
    assert "RAY_AUTH_TOKEN_PATH" in fix
    cause, fix = local_head.explain_failure("OSError: [Errno 98] Address already in use\n")
    assert "Address already in use" in cause and "port" in fix
    assert local_head.explain_failure("")[0] == "no output"


def test_joining_a_cluster_started_elsewhere_sends_a_token_when_one_is_at_hand(state, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert local_head.cluster_join_env() == {}  # no token anywhere: join as Ray would without one
    (tmp_path / "home" / ".ray").mkdir(parents=True)
    (tmp_path / "home" / ".ray" / "auth_token").write_text("a" * 64)
    assert local_head.cluster_join_env() == {"RAY_AUTH_MODE": "token"}  # Ray's default place
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert local_head.cluster_join_env() == {}  # the user chose
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / "home" / ".ray" / "auth_token").unlink()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "theirs")
    assert local_head.cluster_join_env() == {"RAY_AUTH_MODE": "token"}
