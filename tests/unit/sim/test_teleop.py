"""The scripted teleoperator: when it overrides the policy, what it returns, and that it never moves the robot."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from fleet.sim import make_env
from fleet.sim.teleop import TeleopConfig, TeleopDecision, Teleoperator
from tests.mocks.sim_helpers import NAMES, assert_tree_equal, assert_unchanged, snapshot


def _env_at(name: str, seed: int, steps: int = 0, shift=None):
    env = make_env(name, shift=shift)
    env.reset(seed=seed)
    for _ in range(steps):
        env.step(env.unwrapped.expert_action())
    return env


def _opposite(env, chunk: np.ndarray) -> np.ndarray:
    """The chunk mirrored inside the action box: low + high - chunk."""
    u = env.unwrapped
    return (u._low + u._high - chunk).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_no_override_when_policy_proposes_the_expert_chunk(name):
    teleop = Teleoperator()
    for seed, steps in ((0, 0), (1, 2), (2, 3)):
        env = _env_at(name, seed, steps)
        proposal = env.unwrapped.expert_chunk()
        before = snapshot(env)
        decision = teleop.review(env, proposal)
        assert_unchanged(env, before)
        assert isinstance(decision, TeleopDecision)
        assert (decision.override, decision.reason) == (False, "ok")
        assert decision.deviation == pytest.approx(0.0, abs=1e-7)
        assert decision.chunk.shape == (16, env.unwrapped.embodiment_spec.action_dim)
        assert decision.chunk.dtype == np.float32
        np.testing.assert_array_equal(decision.chunk, proposal)
    assert (teleop.reviews, teleop.overrides) == (3, 0)


@pytest.mark.parametrize("name", NAMES)
def test_small_deviation_is_tolerated(name):
    env = _env_at(name, seed=3, steps=1)
    u = env.unwrapped
    expert = u.expert_chunk()
    noise = np.random.default_rng(0).uniform(-0.02, 0.02, size=expert.shape) * (u._high - u._low)
    decision = Teleoperator().review(env, (expert + noise).astype(np.float32))
    assert not decision.override and decision.reason == "ok"
    assert 0.0 < decision.deviation <= 0.02 + 1e-6


@pytest.mark.parametrize("shift", [None, "actuator_bias"], ids=["plain", "actuator_bias"])
@pytest.mark.parametrize("proposal_kind", ["zeros", "opposite"])
@pytest.mark.parametrize("name", NAMES)
def test_override_stray_when_far_off(name, proposal_kind, shift):
    teleop = Teleoperator()
    for seed in range(5):
        env = _env_at(name, seed, shift=shift)
        u = env.unwrapped
        expert = u.expert_chunk()
        proposal = np.zeros_like(expert) if proposal_kind == "zeros" else _opposite(env, expert)
        before = snapshot(env)
        decision = teleop.review(env, proposal)
        assert_unchanged(env, before)
        assert decision.override and decision.reason == "stray", decision.deviation
        assert decision.deviation > teleop.config.tolerance
        assert decision.chunk.shape == (16, u.embodiment_spec.action_dim) and decision.chunk.dtype == np.float32
        np.testing.assert_array_equal(decision.chunk, expert)
        assert all(env.action_space.contains(row) for row in decision.chunk)
    assert (teleop.reviews, teleop.overrides) == (5, 5)


@pytest.mark.parametrize("name", NAMES)
def test_override_help_when_asked(name):
    teleop = Teleoperator()
    env = _env_at(name, seed=6, steps=1)
    expert = env.unwrapped.expert_chunk()
    before = snapshot(env)
    for proposal in (expert, np.zeros_like(expert)):
        decision = teleop.review(env, proposal, asked_for_help=True)
        assert decision.override and decision.reason == "help"
        assert decision.chunk.shape == (16, env.unwrapped.embodiment_spec.action_dim)
        np.testing.assert_array_equal(decision.chunk, expert)
    assert_unchanged(env, before)
    assert (teleop.reviews, teleop.overrides) == (2, 2)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_proposal_is_overridden(name):
    env = _env_at(name, seed=7)
    proposal = env.unwrapped.expert_chunk()
    proposal[0, 0] = np.nan
    proposal[1, -1] = np.inf
    decision = Teleoperator(TeleopConfig(tolerance=0.2)).review(env, proposal)
    assert decision.override and decision.reason == "stray"
    assert np.isfinite(decision.chunk).all()


@pytest.mark.parametrize("name", NAMES)
def test_demonstrate_is_the_expert_chunk(name):
    env = _env_at(name, seed=8, steps=2)
    before = snapshot(env)
    demo = Teleoperator().demonstrate(env)
    assert_unchanged(env, before)
    assert demo.shape == (16, env.unwrapped.embodiment_spec.action_dim)
    np.testing.assert_array_equal(demo, env.unwrapped.expert_chunk())
    np.testing.assert_array_equal(demo[0], env.unwrapped.expert_action())


def _corrected_episode(env, propose) -> tuple[bool, Teleoperator]:
    """Run one episode where the policy proposes `propose(env)` and the human reviews every 4 steps."""
    teleop = Teleoperator()
    done, info = False, {}
    while not done:
        decision = teleop.review(env, propose(env))
        for action in decision.chunk[:4]:
            _, _, term, trunc, info = env.step(action)
            done = term or trunc
            if done:
                break
    return bool(info["is_success"]), teleop


@pytest.mark.parametrize("name", NAMES)
def test_corrections_rescue_a_wrong_policy(name):
    """A policy that always proposes the opposite of the right chunk, corrected by the human, completes the task."""
    env = _env_at(name, seed=9)
    ok, teleop = _corrected_episode(env, lambda e: _opposite(e, e.unwrapped.expert_chunk()))
    assert ok, f"{name}: corrected episode failed"
    assert teleop.overrides == teleop.reviews >= 1


@pytest.mark.parametrize(
    "name",
    NAMES,
)
def test_corrections_rescue_a_stalled_policy(name):
    """A policy that always proposes zeros (does nothing), corrected by the human, still completes the task."""
    env = _env_at(name, seed=9)
    ok, teleop = _corrected_episode(env, lambda e: np.zeros((16, e.unwrapped.embodiment_spec.action_dim), np.float32))
    assert ok, f"{name}: the robot stalled and the human never took over"
    assert teleop.overrides >= 1


def test_compare_steps_limits_what_is_judged():
    env = _env_at("franka", seed=10)
    expert = env.unwrapped.expert_chunk()
    late_garbage = expert.copy()
    late_garbage[4:] = _opposite(env, expert)[4:]
    assert not Teleoperator(TeleopConfig(compare_steps=4)).review(env, late_garbage).override
    assert Teleoperator(TeleopConfig(compare_steps=16)).review(env, late_garbage).override


def test_tolerance_is_configurable():
    env = _env_at("franka", seed=11)
    zeros = np.zeros_like(env.unwrapped.expert_chunk())
    dev = Teleoperator().deviation(env, zeros)
    assert 0.2 < dev < 1.0
    assert not Teleoperator(TeleopConfig(tolerance=1.0)).review(env, zeros).override
    assert Teleoperator(TeleopConfig(tolerance=0.1)).review(env, zeros).override


@pytest.mark.parametrize("kwargs", [{"tolerance": 0.0}, {"tolerance": -0.1}, {"tolerance": 1.5}, {"compare_steps": 0}])
def test_config_validation(kwargs):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field):
        TeleopConfig(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shape_proposal_rejected(name):
    env = _env_at(name, seed=12)
    d = env.unwrapped.embodiment_spec.action_dim
    before = snapshot(env)
    for bad in (np.zeros((16, d + 1)), np.zeros((16,)), np.zeros((16, d, 1))):
        with pytest.raises(ValueError, match="policy_chunk"):
            Teleoperator().deviation(env, bad)
    assert_unchanged(env, before)


def test_works_through_wrappers_and_refuses_foreign_envs():
    env = gym.wrappers.TimeLimit(make_env("leap"), max_episode_steps=40)
    env.reset(seed=13)
    proposal = env.unwrapped.expert_chunk()
    assert not Teleoperator().review(env, proposal).override
    foreign = gym.make("CartPole-v1")
    foreign.reset(seed=0)
    with pytest.raises(TypeError, match="fleet simulator"):
        Teleoperator().review(foreign, np.zeros((16, 1), np.float32))


def test_review_is_deterministic():
    a, b = _env_at("aloha", seed=14), _env_at("aloha", seed=14)
    proposal = np.zeros((16, 14), np.float32)
    assert_tree_equal(vars(Teleoperator().review(a, proposal)), vars(Teleoperator().review(b, proposal)))
