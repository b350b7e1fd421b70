"""fleet.policy.openmp: every process waits passively at OpenMP barriers except `fleet pretrain` on >1 thread;
importing `fleet` sets nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleet.policy.openmp import owns_the_cores, set_omp_wait_policy


@pytest.mark.parametrize(
    ("argv", "owns"),
    [
        (["/venv/bin/fleet", "pretrain"], True),
        (["/venv/bin/fleet", "pretrain", "--threads", "2"], True),
        (["/venv/bin/fleet", "pretrain", "--threads=1"], False),
        (["/venv/bin/fleet", "pretrain", "--out", "x", "--threads", "1"], False),
        (["/venv/bin/fleet", "eval", "-e", "franka"], False),
        (["/venv/bin/fleet"], False),
        (["/usr/bin/python", "pretrain"], False),
    ],
)
def test_only_a_multithreaded_pretrain_owns_the_cores(argv, owns) -> None:
    assert owns_the_cores(argv) is owns


def test_policy_is_passive_unless_the_environment_or_pretrain_says_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    set_omp_wait_policy(["/venv/bin/fleet", "pretrain"])
    assert "OMP_WAIT_POLICY" not in os.environ
    set_omp_wait_policy(["/venv/bin/fleet", "status"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_omp_wait_policy(["/venv/bin/fleet", "status"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # an explicit setting wins
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    set_omp_wait_policy(["/venv/bin/fleet", "status"])
    assert "OMP_WAIT_POLICY" not in os.environ


def test_importing_fleet_and_the_cli_changes_no_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, fleet, fleet.cli; assert 'OMP_WAIT_POLICY' not in os.environ, os.environ['OMP_WAIT_POLICY']"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
