"""Chaos on the learner: killed while it watches a rollout. What must hold: the restarted learner still
watches it (the watch is in its saved state), and rolls the head back when the fleet does worse on it."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.integration.test_learner import FAST, checkpoint, fleet, send, wait_for  # noqa: F401 - fixtures

pytestmark = [pytest.mark.chaos, pytest.mark.ray]


def test_a_learner_killed_mid_watch_still_rolls_back_a_worse_head(ray_session, fleet, checkpoint) -> None:  # noqa: F811
    ray = ray_session
    replay, registry, start, _ = fleet
    ckpt, demo = checkpoint
    learner = start(ckpt, {"adapt": FAST, "watch_episodes": 5, "min_reference": 5})
    ok = {"robot_id": "robot-franka-0", "embodiment": "franka", "episode": 0, "success": True}
    wait_for(ray, learner, lambda s: s["state"] == "idle")
    send(ray, replay, demo, range(0, 24, 2))
    wait_for(ray, learner, lambda s: s["published"] == 1 and "franka" in s["watch"])
    v1 = ray.get(registry.get.remote("franka", 1))[1]

    old_pid = ray.get(learner.__ray_call__.remote(lambda self: os.getpid()))
    ray.kill(learner, no_restart=False)  # mid-watch: Ray restarts it, its memory is gone
    deadline = time.monotonic() + 120
    while True:  # until the new incarnation answers (the old one may answer once more while the kill lands)
        try:
            pid = ray.get(learner.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
            status = ray.get(learner.status.remote(), timeout=30)
            if pid != old_pid and status["state"] == "idle":
                break
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "the learner did not come back"
        time.sleep(0.5)
    assert "franka" in status["watch"] and status["watch"]["franka"]["version"] == 2  # before: forgotten
    ray.get(learner.record_outcomes.remote([ok | {"head_version": 1}] * 10))
    ray.get(learner.record_outcomes.remote([ok | {"head_version": 2, "success": False}] * 5))
    status = wait_for(ray, learner, lambda s: s["rollbacks"] == 1)
    assert ray.get(registry.latest.remote()) == {"franka": 3}
    assert ray.get(registry.get.remote("franka", 3))[1] == v1 and not status["watch"]
    print(f"\nCHAOS learner kill: {json.dumps({'rolled_back': 2, 'restored_as': 3, 'rollbacks': 1})}")
