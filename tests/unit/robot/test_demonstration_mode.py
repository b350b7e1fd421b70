"""Demonstration mode of the robot loop (a body with no trained head yet, `fleet embodiment add`): the operator
drives every tick, each chunk becomes a correction with no policy action, the policy server is never asked, and
`start_policy()` hands the robot to the policy at the next episode boundary."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.data.correction import validate_correction
from fleet.embodiments import CATALOG, EMBODIMENTS, register_embodiment
from fleet.robot import RobotConfig, RobotLoop
from fleet.sim import make_env
from tests.mocks.fake_policy import FakePolicy
from tests.unit.robot.test_robot_loop import run_episodes

SO100 = CATALOG["so100"]


@pytest.fixture
def so100():
    """so100 in the registry for the test (a body `fleet embodiment add` registers in each fleet process)."""
    added = SO100.name not in EMBODIMENTS
    register_embodiment(SO100, replace=True) if not added else register_embodiment(SO100)
    yield SO100
    if added:
        EMBODIMENTS.pop(SO100.name, None)


class Refusing:
    """A policy client that must not be asked (demonstration mode talks to the operator only)."""

    calls = 0

    def submit(self, request: dict) -> None:
        self.calls += 1
        raise AssertionError("demonstration mode asked the policy server")

    def poll(self, timeout_s: float = 0.0):
        return None

    def cancel(self) -> None:
        pass


def demo_loop(client, seed: int = 0, **config) -> tuple[RobotLoop, list]:
    stored: list = []
    cfg = RobotConfig("robot-so100-0", "so100", seed=seed, demonstrate=True, **config)
    return RobotLoop(cfg, client, stored.extend, env=make_env("so100")), stored


def test_every_tick_the_operator_drove_is_stored_as_a_correction_with_no_policy_action(so100):
    client = Refusing()
    loop, stored = demo_loop(client)
    run_episodes(loop, 2)
    assert client.calls == 0
    r = loop.report()
    assert r["phase"] == "demonstrations" and r["demo_episodes"] == 2 and r["success_rate"] == 1.0
    assert r["latency_p50_ms"] is None  # the operator's answers are no policy latency
    # one stored chunk per tick (the operator is asked every tick, with the observation the next tick acts on)
    assert len(stored) == r["demonstrations"] == r["ticks"]
    for c in stored:
        c = validate_correction(c.to_dict(), EMBODIMENTS)
        assert c.policy_chunk is None and c.reason == "demo" and c.head_version == 0
        assert c.corrected_chunk.shape == (so100.chunk_size, so100.action_dim)
    assert {c.episode for c in stored} == {0, 1}
    ticks = [c.tick for c in stored if c.episode == 0]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # consecutive: nothing skipped
    # their outcomes name no head version: the rollback watch and the learner ignore them
    outcomes = loop.take_outcomes()
    assert len(outcomes) == 2 and all(o.head_version is None and o.head_versions == () for o in outcomes)
    assert loop.degradation.state.value == "normal"


def test_start_policy_switches_at_the_next_episode_boundary(so100):
    env = make_env("so100")
    policy = FakePolicy(env, "expert")
    stored: list = []
    cfg = RobotConfig("robot-so100-0", "so100", demonstrate=True, teleop=False)
    loop = RobotLoop(cfg, policy, stored.extend, env=env)
    for _ in range(3):
        loop.tick()
    assert loop.start_policy() is True and loop.phase == "demonstrations"  # the episode in progress finishes
    demos_then = loop.stats.demonstrations
    run_episodes(loop, 1)
    assert loop.phase == "policy" and loop.buffer.config.recompute_every == so100.recompute_every
    assert loop.stats.demonstrations > demos_then  # the episode in progress was demonstrated to its end
    run_episodes(loop, 2)
    r = loop.report()
    assert r["demo_episodes"] == 1 and r["head_version"] == 1 and r["policy_calls"] > 0
    assert r["latency_p50_ms"] is not None
    assert all(c.policy_chunk is None for c in stored) and {c.episode for c in stored} == {0}
    assert loop.start_policy() is False  # already there


def test_demo_noise_moves_the_robot_off_the_operators_path_and_stores_the_intent(so100):
    def path(noise: float):
        loop, stored = demo_loop(Refusing(), seed=3, demo_noise=noise)
        sent = []
        while loop.stats.episodes_done < 1:
            sent.append(loop.tick().sent)
        return np.stack(sent), stored

    quiet, quiet_stored = path(0.0)
    again, _ = path(0.0)
    noisy, noisy_stored = path(0.2)
    np.testing.assert_array_equal(quiet, again)  # without noise the operator's path is deterministic
    n = min(len(quiet), len(noisy))
    assert not np.allclose(quiet[:n], noisy[:n])
    # what is stored is what the operator asked for, inside the action bounds, not the noisy command
    low, high = np.asarray(so100.action_low), np.asarray(so100.action_high)
    for c in noisy_stored:
        assert np.all(c.corrected_chunk >= low - 1e-6) and np.all(c.corrected_chunk <= high + 1e-6)
    with pytest.raises(ValueError, match="demo_noise"):
        RobotConfig("r", "so100", demo_noise=1.5)
    with pytest.raises(ValueError, match="demonstrate"):
        RobotConfig("r", "so100", demonstrate="yes")


def test_noisy_demonstrations_keep_clear_of_the_estop_with_so100s_workspace_guard(so100, monkeypatch):
    """Noise 0.2 pushes the fingertip into the table now and then; so100's task-space wall (the safety layer's
    workspace guard, from the simulator through SimRobot) keeps it within 1 cm (8 N), so the force e-stop (25 N)
    stays quiet. Without the guard the same 10 episodes latch it."""
    import sys

    import fleet.robot.sim_robot  # noqa: F401 - the module (fleet.robot re-exports its function of that name)

    def trips() -> tuple[int, int]:
        loop, _ = demo_loop(Refusing(), seed=1, demo_noise=0.2)
        while loop.stats.episodes_done < 10:
            loop.tick()
            if loop.safety.estopped:
                loop.reset_estop()  # the operator resets it; the demonstrations go on
        return loop.safety.stats()["estop_trips"], loop.safety.stats()["workspace"]

    trips_guarded, limited = trips()
    assert trips_guarded == 0 and limited > 0
    monkeypatch.setattr(sys.modules["fleet.robot.sim_robot"].SimRobot, "workspace_guard", property(lambda s: None))
    assert trips()[0] >= 1
