"""The multi-rate runtime on a simulated clock: every body runs its four loops at their rates with no limit
violated, runs are deterministic, and a force spike or a stale camera frame acts within one command period."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS, command_spec
from fleet.robot import RobotConfig, RobotLoop
from fleet.robot.runtime import RobotRuntime, RuntimeConfig
from fleet.robot.scheduler import Scheduler, SimClock
from fleet.robot.sim_robot import SimRobot, SimTask
from fleet.sim import make_env
from tests.mocks.fake_policy import FakePolicy

NAMES = ("franka", "aloha", "hello", "leap")


class RecordingRobot(SimRobot):
    """A SimRobot that records every command, and whose force or camera a test can script."""

    def __init__(self, env, clock, substeps):
        super().__init__(env, clock, substeps)
        self.sent: list[tuple[float, list[float]]] = []
        self.force_at: float | None = None  # from this time on, the force sensor reads 10 x max_force
        self.camera_dies_at: float | None = None  # from this time on, the camera delivers no new frame
        self._frame: tuple[np.ndarray, float] | None = None

    def send_action(self, action):
        out = super().send_action(action)
        self.sent.append((self.clock(), list(map(float, out))))
        return out

    def _on_reset(self, obs, info):
        super()._on_reset(obs, info)
        self.resets = getattr(self, "resets", [])
        self.resets.append(len(getattr(self, "sent", [])))

    def read_force(self) -> float:
        if self.force_at is not None and self.clock() >= self.force_at:
            return 10.0 * self.spec.max_force
        return super().read_force()

    def read_camera(self):
        if self.camera_dies_at is None or self.clock() < self.camera_dies_at or self._frame is None:
            self._frame = super().read_camera()
        return self._frame


def build(name: str, seed: int = 0, **runtime):
    clock = SimClock()
    env = make_env(name)
    spec = EMBODIMENTS[name]
    robot = RecordingRobot(env, clock.now, round(command_spec(name).command_hz / spec.control_hz))
    robot.connect()
    loop = RobotLoop(
        RobotConfig(f"r-{name}", name, seed=seed, teleop=False), FakePolicy(env), robot=robot, task=SimTask(robot)
    )
    scheduler = Scheduler(clock)
    rt = RobotRuntime(loop, scheduler, RuntimeConfig(verify=True, **runtime))
    return rt, scheduler, robot


@pytest.mark.parametrize("name", NAMES)
def test_every_body_runs_its_loops_at_their_rates_within_limits(name):
    rt, scheduler, robot = build(name)
    scheduler.run(until=4.0)
    r = rt.report()
    rates = {lp["loop"]: lp for lp in r["loops"]}
    spec = EMBODIMENTS[name]
    want = {"camera": 30.0, "proprio": 100.0, "policy": spec.control_hz, "controller": command_spec(name).command_hz}
    for loop_name, hz in want.items():
        assert rates[loop_name]["achieved_hz"] == pytest.approx(hz, rel=1e-6), loop_name
        assert rates[loop_name]["missed"] == 0 and rates[loop_name]["errors"] == 0
    assert r["violations"] == 0 and r["estop_ticks"] == 0 and r["stale_frame_ticks"] == 0
    assert r["commands"] == rates["controller"]["ticks"]  # every command period sent a command
    assert rt.loop.stats.episodes_done >= 1 and rt.loop.stats.successes >= 1
    # the world moved once per policy period, with the mean of that period's setpoints
    assert robot.world_steps >= rates["policy"]["ticks"] - 2
    assert r["frame_to_command_ms"]["p50"] is not None


def test_runs_on_the_simulated_clock_are_deterministic():
    digests = []
    for _ in range(2):
        rt, scheduler, robot = build("franka", seed=3)
        scheduler.run(until=3.0)
        digests.append(hashlib.sha256(np.asarray([x for _, x in robot.sent]).tobytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("name", ("franka", "leap"))
def test_a_force_spike_stops_the_robot_in_the_same_command_period(name):
    rt, scheduler, robot = build(name)
    scheduler.run(until=1.0)
    spike = 1.0 + 0.37 * rt.limits.dt  # between two command periods
    robot.force_at = spike
    scheduler.run(until=1.5)
    first = next(i for i, (t, _) in enumerate(robot.sent) if t >= spike)
    t, x = robot.sent[first]
    assert t - spike < rt.limits.dt  # the first command period after the spike ...
    assert rt.loop.safety.estopped and rt.loop.state == "estop"
    spec = EMBODIMENTS[name]
    held = robot.sent[first - 1][1] if spec.stop_action is None else list(spec.stop_action)
    np.testing.assert_allclose(x, held, atol=1e-6)  # ... already commands the hold
    # and it stays latched, where the body is (until the sim's episode clock resets the world)
    end = min([i for i in robot.resets if i > first] + [len(robot.sent)])
    assert end - first > 50 and all(np.allclose(x2, held, atol=1e-6) for _, x2 in robot.sent[first:end])
    assert rt.report()["estop_ticks"] == len(robot.sent) - first


def test_a_stale_camera_frame_makes_the_robot_hold_within_one_command_period():
    rt, scheduler, robot = build("hello")  # velocity commands: the hold is the stop command
    scheduler.run(until=2.0)
    robot.camera_dies_at = 2.0
    scheduler.run(until=3.0)
    last_frame = rt.frame_t
    limit = last_frame + rt.stale_after
    first_stale = next(i for i, (t, _) in enumerate(robot.sent) if t > limit)
    assert robot.sent[first_stale][0] - limit <= rt.limits.dt
    assert rt.stale_frame_ticks == sum(1 for t, _ in robot.sent if t > limit)
    # from that period on the setpoints head for the stop command within the rate limits, and reach it
    stop = np.asarray(EMBODIMENTS["hello"].stop_action)
    dist = [np.abs(np.asarray(x) - stop).max() for _, x in robot.sent[first_stale:]]
    assert all(b <= a + 1e-12 for a, b in zip(dist, dist[1:], strict=False))
    assert dist[-1] == pytest.approx(0.0, abs=1e-12)
    assert rt.report()["violations"] == 0
    assert rt.loop.frame_holds > 0 and rt.loop.state == "holding"


def test_a_body_without_a_command_rate_passes_the_policy_actions_through():
    clock = SimClock()
    env = make_env("hello")
    robot = SimRobot(env, clock.now, 1)
    robot.connect()
    loop = RobotLoop(RobotConfig("r", "hello", teleop=False), FakePolicy(env), robot=robot, task=SimTask(robot))
    scheduler = Scheduler(clock)
    rt = RobotRuntime(loop, scheduler, RuntimeConfig(command_hz=EMBODIMENTS["hello"].control_hz))
    scheduler.run(until=20.0)
    r = rt.report()
    assert r["controller"] == "pass-through" and {lp["loop"] for lp in r["loops"]} == {"camera", "proprio", "policy"}
    assert r["commands"] == loop.total_ticks and loop.stats.successes >= 1
