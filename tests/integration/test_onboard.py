"""The live onboarding path on a real local Ray: a running fleet gets a new body (`fleet embodiment add`), its
robots (robot actors in demonstration mode) demonstrate into the replay store, the onboarding learner reads them
there and publishes v1 after the held-out check, every replica learns the body from the registry without a
restart, the same robots switch to policy episodes; the other robot never pauses and the other heads stay
bit-identical."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fleet.cluster.config import FleetConfig  # noqa: E402
from fleet.cluster.launcher import FleetError, down, reset_estop, scale, status, up  # noqa: E402
from fleet.embodiments import CATALOG  # noqa: E402
from fleet.policy.checkpoint import save_checkpoint  # noqa: E402
from fleet.policy.train import build_model  # noqa: E402
from fleet.protocol import make_request  # noqa: E402
from fleet.sim import make_env  # noqa: E402
from tests.mocks.tiny_policy import TINY  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def franka_chunk(handle) -> np.ndarray:
    obs, _ = make_env("franka", seed=5).reset()
    reply = handle.act.remote(make_request("probe", "franka", obs, request_id=uuid.uuid4().hex)).result(timeout_s=60)
    return np.asarray(reply["chunk"])


def small_fleet(tmp_path, prefix: str) -> FleetConfig:
    """One franka robot on a tiny franka-only checkpoint, run flat out in its own namespace (and e-stop state
    directory): the fleet a body is added to in these tests."""
    os.environ["FLEET_STATE_DIR"] = str(tmp_path / "state")
    ckpt = tmp_path / "ckpt" / "policy"
    save_checkpoint(build_model(("franka",), config=TINY), ckpt)
    tag = uuid.uuid4().hex[:6]
    return FleetConfig(
        robots={"franka": 1},
        checkpoint=str(ckpt),
        replica_cpus=0.5,
        realtime=False,
        namespace=f"{prefix}-{tag}",
        app_name=f"fleet-policy-{tag}",
        log_dir=str(tmp_path / "log"),
        server={"threads": 1, "max_batch_size": 16, "poll_interval_s": 0.2},
    )


def test_add_a_body_to_a_running_fleet(ray_session, tmp_path):
    from ray import serve

    from actors.onboarder import onboarder_name
    from fleet.cli.onboard_cmds import add_embodiment_to_fleet, onboarding_status

    config = small_fleet(tmp_path, "fleet-onboard")
    up(config)
    try:
        handle = serve.get_app_handle(config.app_name)
        before = franka_chunk(handle)
        franka_eps = status(namespace=config.namespace)["robots"][0]["episodes"] or 0
        # the held-out check is real (closed loop on unseen scenes); a tiny model cannot pass 80 %, so the test
        # asks for 0 % to reach the policy phase quickly: what it checks is the path, not the learning
        plan = CATALOG["so100"].to_dict() | {
            "sim": "so100",
            "like": "franka",
            "robots": 2,
            "first_round_demos": 4,
            "first_round_steps": 20,
            "demos_per_round": 4,
            "steps_per_round": 20,
            "train_threads": 1,
            "check_episodes": 2,
            "check_success": 0.0,
        }
        t_add = time.monotonic()
        added = add_embodiment_to_fleet(plan, namespace=config.namespace)
        assert added == {
            "embodiment": "so100",
            "robots": 2,
            "first_round_demos": 4,
            "demos_per_round": 4,
            "phase": "demonstrations",
        }
        with pytest.raises(ValueError, match="already serves"):
            add_embodiment_to_fleet(_franka_plan(plan), namespace=config.namespace)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            body = onboarding_status(config.namespace)["bodies"]["so100"]
            if sum(r["policy_episodes"] for r in body["robots"]) >= 1:
                print(f"fleet embodiment add -> first policy-driven episode: {time.monotonic() - t_add:.0f} s")
                break
            assert body["errors"] == 0, body["last_error"]
            time.sleep(1.0)
        else:
            raise AssertionError(f"no policy-driven episode of the new body: {body}")
        # v1 came from demonstrations; the operator's corrections may already have made a v2 (also checked)
        assert body["phase"] == "policy" and body["head_version"] >= 1
        (first,) = [r for r in body["rounds"] if r["published"]][:1]
        assert first["demos"] >= 4 and first["steps"] == 20
        # the timeline since the add, in the order it happened
        timeline = body["timeline"]
        assert list(timeline) == ["robots", "first_round", "v1", "first_policy_episode"]
        assert 0 < timeline["robots"] <= timeline["first_round"] <= timeline["v1"] <= timeline["first_policy_episode"]
        assert timeline["first_policy_episode"] <= time.monotonic() - t_add + 1.0
        # the demonstrations went through the replay store as corrections with no policy action
        from fleet.names import REPLAY

        replay = ray_session.get_actor(REPLAY, namespace=config.namespace)
        demos = ray_session.get(replay.since.remote("so100", 0))["corrections"]
        assert body["records"] >= first["demos"] and len(demos) >= 1
        assert all(c.embodiment == "so100" for c in demos) and any(c.policy_chunk is None for c in demos)
        # the robots are robot actors of the fleet that switched to the policy at an episode boundary
        robot0 = ray_session.get_actor("robot-so100-0", namespace=config.namespace)
        report = ray_session.get(robot0.report.remote())
        assert report["phase"] == "policy" and report["demo_episodes"] >= 1 and report["policy_calls"] >= 1
        # below the fleet it joins (Ray's workers run at 15)
        assert ray_session.get(robot0.__ray_call__.remote(lambda self: os.getpriority(os.PRIO_PROCESS, 0))) >= 18
        assert all(r["phase"] == "policy" for r in body["robots"] if r["policy_episodes"])
        # training yields the CPU: the lowest niceness; not SCHED_IDLE beside a fleet that runs flat out
        assert body["niceness"] == 19 and body["sched_idle"] is False
        s = status(namespace=config.namespace)
        assert s["heads"]["so100"] >= 1 and s["heads"]["franka"] == 1  # replicas serve it, franka untouched
        # `fleet status` lists the added body's robots with the others, and its phase
        assert {"robot-so100-0", "robot-so100-1"} <= {r["id"] for r in s["robots"]}
        assert s["added"]["so100"]["phase"] == "policy" and "handles" not in s["added"]["so100"]
        assert (s["robots"][0]["episodes"] or 0) > franka_eps  # the other robot kept working meanwhile
        np.testing.assert_array_equal(franka_chunk(handle), before)  # franka's head bit-identical
        obs, _ = make_env("so100", seed=3).reset()
        reply = handle.act.remote(make_request("probe", "so100", obs, request_id="x")).result(timeout_s=60)
        assert reply["head_version"] >= 1 and np.asarray(reply["chunk"]).shape == (16, 6)
        # `fleet scale` reaches an added body as it does the pretrained four; an unknown one is named
        out = scale({"so100": 3, "franka": 1}, namespace=config.namespace)
        assert out["robots"]["so100"] == 3 and out["robots"]["franka"] == 1 and out["added"] == ["robot-so100-2"]
        assert len(onboarding_status(config.namespace)["bodies"]["so100"]["robots"]) == 3
        with pytest.raises(FleetError, match="unknown embodiment 'so200'"):
            scale({"so200": 1}, namespace=config.namespace)
        # `fleet estop reset` reaches the added body's robots through their onboarding actor
        assert reset_estop("robot-so100-0", namespace=config.namespace) == {
            "robot": "robot-so100-0",
            "was_latched": False,
        }
        with pytest.raises(FleetError, match="robot-so100-7"):
            reset_estop("robot-so100-7", namespace=config.namespace)
    finally:
        try:
            ray_session.kill(ray_session.get_actor(onboarder_name("so100"), namespace=config.namespace))
        except ValueError:
            pass
        down(namespace=config.namespace, stop_cluster=False)


def _franka_plan(plan: dict) -> dict:
    from fleet.embodiments import EMBODIMENTS

    return plan | EMBODIMENTS["franka"].to_dict()
