"""Chaos on a body being onboarded: its replay store and one of its robots killed mid-way. What must hold: the
restarted store still knows the body (its spec is kept beside the log) and holds every record acknowledged
before; onboarding goes on to v1 through it; a robot Ray restarts comes back demonstrating and is told again to
run the policy once the body is served."""

from __future__ import annotations

import json
import os
import time

import pytest

torch = pytest.importorskip("torch")

from fleet.cluster.launcher import down, up  # noqa: E402
from fleet.embodiments import CATALOG  # noqa: E402
from fleet.names import REPLAY  # noqa: E402
from tests.integration.test_onboard import small_fleet  # noqa: E402

pytestmark = [pytest.mark.chaos, pytest.mark.ray]


def _until(check, what: str, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
            if got:
                return got
        except Exception:  # noqa: BLE001 - an actor restarting answers with an error for a while
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _restarted(ray, actor, old_pid: int) -> bool:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10) != old_pid


def test_onboarding_survives_its_replay_store_and_a_robot_restarting(ray_session, tmp_path):
    from actors.onboarder import onboarder_name
    from fleet.cli.onboard_cmds import add_embodiment_to_fleet, onboarding_status

    ray = ray_session
    config = small_fleet(tmp_path, "fleet-onboard-chaos")
    ns = config.namespace
    up(config)
    try:
        plan = CATALOG["so100"].to_dict() | {"sim": "so100", "like": "franka", "robots": 2}
        plan |= {"first_round_demos": 30, "first_round_steps": 20, "demos_per_round": 400, "train_threads": 1}
        plan |= {"check_episodes": 2, "check_success": 0.0}
        add_embodiment_to_fleet(plan, namespace=ns)
        replay = ray.get_actor(REPLAY, namespace=ns)
        held = _until(lambda: ray.get(replay.counts.remote())["so100"]["total_added"] >= 20, "20 records")
        before = ray.get(replay.counts.remote())["so100"]["total_added"]
        pid = ray.get(replay.__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(replay, no_restart=False)  # mid-demonstrations: Ray restarts it from its log
        _until(lambda: _restarted(ray, replay, pid), "the replay store to come back")
        stats = ray.get(replay.stats.remote())
        assert held and stats["added_at_start"] == ["so100"]  # before: its rows refused as an unknown body
        assert ray.get(replay.counts.remote())["so100"]["total_added"] >= before  # nothing acknowledged lost

        body = _until(lambda: (b := onboarding_status(ns)["bodies"]["so100"])["phase"] == "policy" and b, "v1", 400)
        assert body["head_version"] >= 1 and body["rounds"][0]["demos"] >= 30

        robot = ray.get_actor("robot-so100-0", namespace=ns)
        _until(lambda: ray.get(robot.report.remote())["phase"] == "policy", "robot-so100-0 on the policy")
        pid = ray.get(robot.__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(robot, no_restart=False)  # Ray restarts it as it was started: demonstrating
        _until(lambda: _restarted(ray, robot, pid), "robot-so100-0 to come back")
        report = _until(
            lambda: (r := ray.get(robot.report.remote()))["phase"] == "policy" and r["policy_calls"] > 0 and r,
            "the restarted robot to be told again",
            120,
        )
        assert report["restarted"] is True
        status = onboarding_status(ns)["bodies"]["so100"]
        print(
            "\nCHAOS onboarding: "
            + json.dumps(
                {
                    "records_before_kill": before,
                    "errors": status["errors"],
                    "records_missed": status["records_missed"],
                    "head_version": status["head_version"],
                }
            )
        )
    finally:
        try:
            ray.kill(ray.get_actor(onboarder_name("so100"), namespace=ns))
        except ValueError:
            pass
        down(namespace=ns, stop_cluster=False)
