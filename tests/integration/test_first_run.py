"""A newcomer's first run, as a user types it: `fleet up` in an empty home directory (no Ray token anywhere, no
RAY_* variables), `fleet status --json` from a second process until every robot has finished an episode and
the replay actor has acknowledged corrections, `fleet scale`, `fleet down` from a third, and nothing left
running afterwards.

This is the check that the README's main command works on a fresh machine: every developer machine had a Ray
token left in ~/.ray from earlier work, which hid that nothing created one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray


def fleet_command() -> list[str]:
    """The installed `fleet` script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("fleet")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from fleet.cli import main; main()"]


def fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "FLEET_STATE_DIR"}
    return env | {"HOME": str(home), "PYTHONUNBUFFERED": "1"}


def processes_mentioning(text: str) -> list[int]:
    """Pids (other than zombies) whose command line mentions `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if text in cmdline and not zombie:
            found.append(int(entry.name))
    return found


def test_fleet_up_status_scale_down_in_an_empty_home(tmp_path):
    from fleet.policy.checkpoint import save_checkpoint
    from fleet.policy.train import build_model

    save_checkpoint(build_model(("franka", "hello"), 0, TINY), tmp_path / "policy")
    home = tmp_path / "home"
    home.mkdir()
    env = fresh_env(home)
    cli = fleet_command()

    def run(*args, timeout=240):
        out = subprocess.run(cli + list(args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"fleet {' '.join(args)}: {out.stderr[-3000:]}"
        return out

    up_args = ["up", "--robots", "franka=1,hello=1", "--sim", "--checkpoint", str(tmp_path / "policy")]
    up_args += ["--http-port", "0", "--openpi-port", "0", "--metrics-port", "0"]  # 8000-8002 may be taken here
    with open(tmp_path / "up.out", "w") as out, open(tmp_path / "up.err", "w") as err:
        up = subprocess.Popen(cli + up_args + ["--duration", "900"], env=env, cwd=tmp_path, stdout=out, stderr=err)
    state_path = home / ".cache" / "fleet" / "cluster.json"
    try:
        deadline = time.monotonic() + 240
        status = None
        while status is None:
            assert up.poll() is None, f"`fleet up` exited {up.returncode}: {(tmp_path / 'up.err').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no episode from every robot within 240 s"
            time.sleep(1.0)
            if state_path.exists():
                s = subprocess.run(cli + ["status", "--json"], env=env, capture_output=True, text=True, timeout=120)
                rows = json.loads(s.stdout)["robots"] if s.returncode == 0 else []
                endpoints = json.loads(s.stdout)["endpoints"] if s.returncode == 0 else {}
                done = rows and all((r["episodes"] or 0) >= 1 for r in rows)
                status = rows if done and sum(r.get("corrections_acked", 0) for r in rows) > 0 else None
        assert {r["id"] for r in status} == {"robot-franka-0", "robot-hello-0"}
        assert all(r["replay_errors"] == 0 for r in status), [r["replay_last_error"] for r in status]
        head = json.loads(state_path.read_text())
        token = Path(head["token_path"])
        assert token.parent == home / ".cache" / "fleet" and stat.S_IMODE(token.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(head["private_dir"]).stat().st_mode) == 0o700
        assert head["auth_mode"] == "token" and not (home / ".ray").exists()  # our token, not Ray's default
        # the endpoints for outside robots are up, on loopback, behind the fleet's own endpoint token (not Ray's)
        assert set(endpoints) == {"http", "openpi", "metrics"} and all("127.0.0.1:" in v for v in endpoints.values())
        api_token = home / ".cache" / "fleet" / "api_token"
        assert stat.S_IMODE(api_token.stat().st_mode) == 0o600 and api_token.read_text() != token.read_text()

        # a second `fleet up` in another shell joins the running head and refuses, leaving the first alone
        again = subprocess.run(cli + up_args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert again.returncode == 2 and "a fleet is already running in namespace 'fleet'" in again.stderr
        assert json.loads(state_path.read_text())["pid"] == head["pid"] and up.poll() is None

        scaled = json.loads(run("scale", "franka=2", "hello=0", "--json").stdout)
        assert scaled["added"] == ["robot-franka-1"] and scaled["removed"][0]["id"] == "robot-hello-0"
        down = run("down")
        assert "stopped the local Ray" in down.stdout
        assert up.wait(timeout=120) == 0  # `fleet up` sees the fleet gone and exits cleanly
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
            subprocess.run(cli + ["down"], env=env, capture_output=True, timeout=300)
    assert "the fleet is gone" in (tmp_path / "up.out").read_text() + (tmp_path / "up.err").read_text()
    assert not state_path.exists() and not Path(head["private_dir"]).exists()
    deadline = time.monotonic() + 60
    while (left := processes_mentioning(head["private_dir"])) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not left, f"processes of the private head still running: {left}"
    assert not processes_mentioning(f"--temp-dir={head['temp_dir']}")
