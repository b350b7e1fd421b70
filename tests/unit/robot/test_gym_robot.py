"""Gymnasium environments this project did not write, as fleet robots (GymRobot + GymTask + gym_embodiment):
registered as embodiments, driven by a policy fake for their action space, through the safety layer, with an
operator's corrections captured as valid Correction records. Each needs the `[gym]` extra and skips without it:
Pendulum-v1 (gymnasium's own, rendered by pygame) and gym-aloha's MuJoCo ALOHA insertion (MUJOCO_GL=egl)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from fleet.data.correction import validate_correction
from fleet.embodiments import EMBODIMENTS, register_embodiment
from fleet.robot import RobotConfig, RobotLoop
from fleet.robot.gym_robot import GymMapping, gym_embodiment, gym_robot, resize_image
from fleet.robot.runtime import RobotRuntime, RuntimeConfig
from fleet.robot.scheduler import Scheduler, SimClock
from tests.mocks.fake_policy import SpacePolicy


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def registered():
    names = []

    def register(spec):
        names.append(spec.name)
        return register_embodiment(spec, replace=True)

    yield register
    for name in names:
        EMBODIMENTS.pop(name, None)


def hold_still(robot, n):
    """The operator's demonstration: hold the last command (zeros before any)."""
    last = robot.hold_action()
    last = np.zeros(robot.spec.action_dim, np.float32) if last is None else last
    return np.repeat(last[None], n, axis=0)


def _run(name, env, mapping, ticks, registered, tolerance=0.05):
    spec = registered(gym_embodiment(name, env, mapping))
    robot, task = gym_robot(env, name, mapping, demonstrator=hold_still)
    got = []
    loop = RobotLoop(
        RobotConfig(f"r-{name}", name, teleop_tolerance=tolerance),
        SpacePolicy(name),
        got.extend,
        robot=robot,
        task=task,
    )
    sent = [loop.tick().sent for _ in range(ticks)]
    loop.flush_corrections()
    return spec, loop, np.asarray(sent), got


def _check(spec, loop, sent, got):
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    assert ((sent >= low - 1e-6) & (sent <= high + 1e-6)).all()
    step = np.asarray(spec.max_velocity) * spec.dt
    moves = np.abs(np.diff(sent, axis=0))
    assert (moves <= step * (1 + 1e-5) + 1e-6).all()  # the safety layer's velocity limit held on every tick
    r = loop.report()
    assert r["policy_calls"] > 0 and r["interventions"] > 0 and r["tick_errors"] == 0
    assert got, "the operator's corrections were captured"
    for c in got:  # records the replay actor accepts for this registered body
        checked = validate_correction(c, {spec.name: spec})
        assert checked.image.shape == (64, 64, 3) and checked.proprio.shape == (spec.proprio_dim,)
        assert checked.corrected_chunk.shape == (spec.chunk_size, spec.action_dim)


def test_resize_image_is_nearest_pixel():
    img = np.arange(480 * 640 * 3, dtype=np.uint32).reshape(480, 640, 3).astype(np.uint8)
    out = resize_image(img)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1, 1], img[7, 10])
    with pytest.raises(ValueError, match="camera image"):
        resize_image(np.zeros((4, 4)))


def test_mapping_errors_name_the_field():
    with pytest.raises(ValueError, match="GymMapping.instruction"):
        GymMapping(instruction="")
    with pytest.raises(ValueError, match="GymMapping.proprio"):
        GymMapping(instruction="x", proprio="agent_pos")


@pytest.mark.skipif(not _has("pygame"), reason="needs the [gym] extra (pygame renders gymnasium's classic control)")
def test_pendulum_runs_as_a_fleet_robot(registered):
    import gymnasium as gym

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    env = gym.make("Pendulum-v1", render_mode="rgb_array")
    mapping = GymMapping(instruction="swing the pendulum up", control_hz=20.0, stop_action=(0.0,))
    spec, loop, sent, got = _run("pendulum", env, mapping, 60, registered)
    assert spec.action_dim == 1 and spec.proprio_dim == 3
    _check(spec, loop, sent, got)
    # and through the multi-rate runtime (a gymnasium env takes commands at its own rate: pass-through)
    clock = SimClock()
    robot, task = gym_robot(env, "pendulum", mapping, clock=clock.now)
    loop2 = RobotLoop(RobotConfig("r2", "pendulum", teleop=False), SpacePolicy("pendulum"), robot=robot, task=task)
    scheduler = Scheduler(clock)
    rt = RobotRuntime(loop2, scheduler, RuntimeConfig(verify=True))
    scheduler.run(until=2.0)
    rep = rt.report()
    assert rep["controller"] == "pass-through" and rep["violations"] == 0 and rep["commands"] >= 39
    assert loop2.stats.policy_calls > 0


@pytest.mark.slow  # ~20 s: gym-aloha renders 640 x 480 camera images on every step
@pytest.mark.skipif(not _has("gym_aloha"), reason="needs the [gym] extra (gym-aloha, MuJoCo with MUJOCO_GL=egl)")
def test_gym_aloha_runs_as_a_fleet_robot(registered):
    os.environ.setdefault("MUJOCO_GL", "egl")
    import gym_aloha  # noqa: F401 - registers the gym_aloha/ envs
    import gymnasium as gym

    env = gym.make("gym_aloha/AlohaInsertion-v0", obs_type="pixels_agent_pos")
    mapping = GymMapping(
        instruction="insert the peg into the socket", image="pixels.top", proprio=("agent_pos",), control_hz=50.0
    )
    spec, loop, sent, got = _run("aloha_insertion", env, mapping, 12, registered)
    assert spec.action_dim == 14 and spec.proprio_dim == 14
    _check(spec, loop, sent, got)
