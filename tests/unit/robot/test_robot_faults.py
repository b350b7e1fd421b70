"""Robot-side faults (issue 17): a tick that raises still commands the hold; an episode's first command is
rate-limited from where the body is; a reply is used only if it answers this robot's request; a transport that
blocks (wedged replica, lost GCS) never stalls the control thread, which commands every period."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.robot import RobotConfig, RobotLoop
from fleet.robot.background import BackgroundClient, DeferredSink
from fleet.robot.sim_robot import SimRobot, SimTask
from fleet.sim import make_env
from tests.mocks.fake_policy import FakePolicy


class CountingRobot(SimRobot):
    def __init__(self, env):
        super().__init__(env)
        self.sent: list[np.ndarray] = []

    def send_action(self, action):
        out = super().send_action(action)
        self.sent.append(out)
        return out


def make(name="franka", client=None, **config):
    env = make_env(name)
    robot = CountingRobot(env)
    robot.connect()
    client = client if client is not None else FakePolicy(env)
    loop = RobotLoop(RobotConfig(f"r-{name}", name, **config), client, robot=robot, task=SimTask(robot))
    return loop, robot


def test_an_exception_inside_a_tick_still_commands_the_hold():
    loop, robot = make(teleop=True)
    for _ in range(5):
        loop.tick()

    def broken(*_a, **_k):
        raise RuntimeError("operator console crashed")

    loop.operator.review = broken
    before = len(robot.sent)
    results = [loop.tick() for _ in range(12)]  # before the fix the exception escaped tick(): no command
    assert len(robot.sent) == before + 12
    assert loop.tick_errors >= 2 and loop.report()["tick_errors"] == loop.tick_errors  # asked again, failed again
    assert any(not r.moved for r in results)  # with nothing new buffered, it holds


def test_the_first_command_of_every_episode_is_rate_limited_from_the_body_pose():
    """leap takes absolute joint targets: before the fix a new episode's first action (and the start-up hold, to
    the zero pose) jumped there unlimited, whatever the hand's pose."""
    loop, robot = make("leap", teleop=False)
    spec = EMBODIMENTS["leap"]
    step = np.asarray(spec.max_velocity) * spec.dt * (1 + 1e-6)
    checked = 0
    for _ in range(400):
        if loop.tick_in_episode == 0:
            pose = robot.hold_action()  # where the hand is as the episode starts
            first = loop.tick()
            assert (np.abs(first.sent - pose) <= step + 1e-6).all(), np.abs(first.sent - pose).max()
            checked += 1
        else:
            loop.tick()
    assert checked >= 3 and loop.stats.episodes_done >= 3


@pytest.mark.parametrize(
    "field,value",
    [("request_id", "r-franka:0:1:other"), ("robot_id", "r-other"), ("embodiment", "aloha"), ("obs_tick", 999)],
)
def test_a_reply_to_another_request_is_refused(field, value):
    loop, robot = make(teleop=False, realtime=True)
    answer = loop.client._answer
    loop.client._answer = lambda request: answer(request) | {field: value}
    for _ in range(10):
        loop.tick()
    r = loop.report()
    assert r["policy_calls"] == 0 and r["mismatched_replies"] >= 2 and r["malformed_replies"] >= 2
    assert r["moved_ticks"] == 0 if "moved_ticks" in r else loop.stats.moved_ticks == 0
    assert "answers another request" in r["last_error"] and field in r["last_error"]


class BlockingClient:
    """A transport wedged inside submit (sendall into a full buffer, a connect, ray.get_actor with the GCS gone)."""

    def __init__(self, env):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fake = FakePolicy(env)

    def submit(self, request):
        self.entered.set()
        self.release.wait(30.0)
        self.fake.submit(request)

    def poll(self, timeout_s=0.0):
        return self.fake.poll(timeout_s)

    def cancel(self):
        self.fake.cancel()


def test_a_blocking_transport_never_stalls_the_control_thread():
    env = make_env("franka")
    inner = BlockingClient(env)
    robot = CountingRobot(env)
    robot.connect()
    loop = RobotLoop(
        RobotConfig("r", "franka", teleop=False, realtime=True),
        BackgroundClient(inner),
        robot=robot,
        task=SimTask(robot),
    )
    done = threading.Event()

    def control():
        for _ in range(40):  # four seconds of control periods while the transport is stuck
            loop.tick()
        done.set()

    threading.Thread(target=control, daemon=True).start()
    # a generous bound, never reached when the loop does not block: with the raw client it waits 30 s
    assert done.wait(20.0), "the control loop blocked on the transport"
    assert inner.entered.is_set() and not inner.release.is_set()  # the transport is still stuck ...
    assert len(robot.sent) == 40  # ... and every period commanded: the hold
    assert loop.stats.moved_ticks == 0 and loop.stats.held_ticks == 40
    inner.release.set()  # the replica comes back: the robot moves again
    for _ in range(200):
        loop.tick()
        if loop.stats.moved_ticks:
            break
    assert loop.stats.moved_ticks > 0


def test_a_deferred_sink_keeps_batches_until_the_real_sink_takes_them():
    got = []
    fail = [True]

    def sink(batch):
        if fail[0]:
            raise ConnectionError("replay actor away")
        got.extend(batch)

    deferred = DeferredSink(sink, limit=5)
    deferred([1, 2, 3])
    with pytest.raises(ConnectionError):
        deferred.drain()
    deferred([4, 5, 6])
    assert len(deferred) == 5 and deferred.dropped == 1  # bounded: the oldest went
    fail[0] = False
    assert deferred.drain() == 5 and got == [2, 3, 4, 5, 6]
