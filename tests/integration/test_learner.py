"""LearnerActor on a real local Ray: publishes to the HeadRegistry from the ReplayActor's corrections, a kill
mid-round publishes nothing and versions stay monotonic, a rollout that lowers success is rolled back."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fleet.cluster.config import FleetConfig  # noqa: E402
from fleet.cluster.launcher import down, status, up  # noqa: E402  (Ray loaded lazily there)
from fleet.data.correction import Correction  # noqa: E402
from fleet.policy.checkpoint import head_from_bytes, save_checkpoint  # noqa: E402
from fleet.policy.demos import collect  # noqa: E402
from fleet.policy.train import build_model  # noqa: E402
from tests.mocks.tiny_policy import TINY  # noqa: E402

pytestmark = pytest.mark.ray

FAST = {"steps": 10, "batch_size": 16, "lr": 3e-3}
SLOW = {"steps": 100_000, "batch_size": 16, "max_round_seconds": None}  # a round that runs until it is killed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny franka-only policy checkpoint and a few expert samples to turn into corrections."""
    out = tmp_path_factory.mktemp("learner-ckpt")
    save_checkpoint(build_model(("franka",), config=TINY), out / "policy")
    return out / "policy", collect("franka", 8, seed=21)


@pytest.fixture
def fleet(ray_session, tmp_path):
    """Yields (replay, registry, start_learner(config) -> handle, names); kills every actor afterwards."""
    from actors.heads import get_head_registry  # ray: the actors load it, only once ray_session started it
    from actors.learner import start_learner  # ray
    from actors.replay import start_replay_actor  # ray

    tag = uuid.uuid4().hex[:8]
    names = {"replay": f"replay-{tag}", "heads": f"heads-{tag}", "learner": f"learner-{tag}"}
    replay = start_replay_actor(tmp_path / "log", name=names["replay"])
    registry = get_head_registry(names["heads"], persist_dir=tmp_path / "heads")
    learners = []

    def start(ckpt, config: dict, name: str | None = None):
        cfg = {"every": 10, "rehearsal_episodes": 2, "poll_interval_s": 0.2} | config
        handle = start_learner(
            str(ckpt),
            config=cfg,
            registry={"name": names["heads"], "namespace": None},
            replay={"name": names["replay"], "namespace": None},
            state_dir=str(tmp_path / "learner"),
            name=name or names["learner"],
            num_cpus=0,
        )
        learners.append(handle)
        return handle

    yield replay, registry, start, names
    for handle in [*learners, replay, registry]:
        ray_session.kill(handle, no_restart=True)


def send(ray, replay, demo, idx) -> None:
    batch = [
        Correction.new(
            robot_id="r0",
            embodiment="franka",
            episode=0,
            tick=int(i),
            image=demo.images[i],
            proprio=demo.proprio[i],
            instruction=demo.instructions[i],
            policy_chunk=demo.actions[i],
            corrected_chunk=demo.actions[i],
            head_version=1,
            reason="stray",
        ).to_dict()
        for i in idx
    ]
    assert len(ray.get(replay.add.remote(batch))["accepted"]) == len(batch)


def wait_for(ray, learner, check, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ray.get(learner.status.remote(), timeout=30)
        if check(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"learner did not get there in {timeout_s} s: {status}")


def versions_loadable(ray, registry) -> list[int]:
    """Every stored version of the franka head, each a complete payload that loads into the model."""
    versions = [r["version"] for r in ray.get(registry.history.remote("franka"))]
    model = build_model(("franka",), config=TINY)
    for v in versions:
        _, payload = ray.get(registry.get.remote("franka", v))
        head_from_bytes(model, "franka", payload)
    return versions


def test_kill_mid_round_publishes_nothing_and_versions_stay_monotonic(ray_session, fleet, checkpoint):
    ray = ray_session
    replay, registry, start, names = fleet
    ckpt, demo = checkpoint
    learner = start(ckpt, {"adapt": FAST, "watch_episodes": 2, "min_reference": 2})
    send(ray, replay, demo, range(0, 24, 2))
    wait_for(ray, learner, lambda s: s["published"] == 1)
    assert ray.get(registry.latest.remote()) == {"franka": 2}
    # the rollout is judged (a watched rollout survives a restart and holds back rounds until judged)
    ok = {"robot_id": "robot-franka-0", "embodiment": "franka", "episode": 0, "success": True}
    ray.get(learner.record_outcomes.remote([ok | {"head_version": 1}] * 2 + [ok | {"head_version": 2}] * 2))
    wait_for(ray, learner, lambda s: not s["watch"])
    ray.kill(learner, no_restart=True)

    # a learner whose round never ends is killed while adapting
    slow = start(ckpt, {"adapt": SLOW}, name=names["learner"] + "-slow")
    send(ray, replay, demo, range(1, 25, 2))
    wait_for(ray, slow, lambda s: s["state"] == "adapting")
    ray.kill(slow, no_restart=True)
    assert ray.get(registry.latest.remote()) == {"franka": 2}
    assert versions_loadable(ray, registry) == [1, 2]

    # the next learner continues from the saved cursor and the registry: the next number, nothing reused
    again = start(ckpt, {"adapt": FAST}, name=names["learner"] + "-again")
    status = wait_for(ray, again, lambda s: s["published"] + s["rounds"] >= 2 and s["state"] == "idle")
    assert status["versions"]["franka"] == ray.get(registry.latest.remote())["franka"]
    versions = versions_loadable(ray, registry)
    assert versions == sorted(set(versions)) and versions[:2] == [1, 2] and versions[-1] >= 2


def test_a_rollout_that_lowers_fleet_success_is_rolled_back(ray_session, fleet, checkpoint):
    ray = ray_session
    replay, registry, start, _ = fleet
    ckpt, demo = checkpoint
    learner = start(ckpt, {"adapt": FAST, "watch_episodes": 5, "min_reference": 5})
    ok = {"robot_id": "robot-franka-0", "embodiment": "franka", "episode": 0, "success": True}
    wait_for(ray, learner, lambda s: s["state"] == "idle")
    assert ray.get(learner.record_outcomes.remote([ok | {"head_version": 1}] * 10)) == 10
    send(ray, replay, demo, range(0, 24, 2))
    wait_for(ray, learner, lambda s: s["published"] == 1 and "franka" in s["watch"])
    v1 = ray.get(registry.get.remote("franka", 1))[1]
    learner.record_outcomes.remote([ok | {"head_version": 2, "success": False}] * 5)  # as robots send them
    status = wait_for(ray, learner, lambda s: s["rollbacks"] == 1)
    assert status["versions"]["franka"] == 3 and not status["watch"]
    assert ray.get(registry.latest.remote()) == {"franka": 3}
    assert ray.get(registry.get.remote("franka", 3))[1] == v1
    (event,) = [e for e in ray.get(learner.history.remote("franka")) if e["event"] == "rollback"]
    assert event["rolled_back"] == 2 and event["restores"] == 1 and event["success"] == 0.0
    assert np.isclose(event["reference"], 1.0)


@pytest.mark.slow
def test_live_fleet_with_adapt_publishes_heads_the_robots_then_run(ray_session, tmp_path, checkpoint):
    """`fleet up --shift franka:actuator_bias --adapt` in miniature: the shifted robot's corrections reach the
    replay actor, the learner adapts and publishes, the server installs the head, the robot runs it and its
    episode outcomes reach the learner; status shows all of it."""
    os.environ["FLEET_STATE_DIR"] = str(tmp_path / "state")
    ckpt, _ = checkpoint
    tag = uuid.uuid4().hex[:6]
    config = FleetConfig(
        robots={"franka": 1},
        checkpoint=str(ckpt),
        replica_cpus=0.5,
        realtime=False,
        shift={"franka": "actuator_bias"},
        namespace=f"fleet-adapt-{tag}",
        app_name=f"fleet-policy-{tag}",
        log_dir=str(tmp_path / "log"),
        server={"threads": 1, "max_batch_size": 16, "poll_interval_s": 0.2},
        adapt=True,
        adapt_every=10,
        learner={"adapt": FAST, "rehearsal_episodes": 2, "poll_interval_s": 0.2, "watch_timeout_s": 5.0},
        learner_cpus=0,
        http_port=None,  # endpoints on free ports or off: 8000-8002 may be taken on a shared machine
        openpi_port=0,
        metrics_port=0,
    )
    up(config)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            s = status(namespace=config.namespace)
            (robot,) = s["robots"]
            if s["heads"].get("franka", 1) >= 2 and (robot["head_version"] or 0) >= 2:
                break
            time.sleep(1.0)
        else:
            raise AssertionError(f"no adapted head reached the robot: {s}")
        learner = s["learner"]
        assert learner["published"] >= 1 and learner["versions"]["franka"] >= 2, learner
        assert robot["corrections_sent"] >= 10, robot
        wait_for(ray_session, ray_session.get_actor("fleet-learner", namespace=config.namespace),
                 lambda st: st["outcomes"]["received"] >= 1)  # fmt: skip
    finally:
        down(namespace=config.namespace, stop_cluster=False)
