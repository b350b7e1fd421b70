"""The privileged scripted expert: its success rate in and out of distribution, expert_chunk (the expert
looked ahead, without touching the env), and focus() (the pretraining target)."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.sim import make_env, render
from tests.mocks.sim_helpers import (
    NAMES,
    assert_tree_equal,
    assert_unchanged,
    expert_episode,
    expert_success,
    mid_action,
    snapshot,
)
from tests.unit.sim.helpers import SHIFT_CASES, SHIFT_IDS, expert_steps

REQUIRED_SUCCESS = 0.98


def _assert_expert_rate(name, shift, episodes, seed0):
    env = make_env(name, shift=shift)
    ok, n, failed = expert_success(env, range(seed0, seed0 + episodes))
    rate = ok / n
    print(f"expert success {name} shift={shift or 'none'}: {ok}/{n} = {rate:.3f}")
    assert rate >= REQUIRED_SUCCESS, f"{name} shift={shift}: expert success {ok}/{n}; failing seeds {failed[:20]}"


@pytest.mark.parametrize("name", NAMES)
def test_expert_success_in_distribution(name):
    _assert_expert_rate(name, None, episodes=100, seed0=1000)


@pytest.mark.parametrize("shift", SHIFT_CASES, ids=SHIFT_IDS)
@pytest.mark.parametrize("name", NAMES)
def test_expert_success_under_shift(name, shift):
    _assert_expert_rate(name, shift, episodes=30, seed0=2000)


@pytest.mark.slow
@pytest.mark.parametrize("shift", [None, *SHIFT_CASES], ids=["none", *SHIFT_IDS])
@pytest.mark.parametrize("name", NAMES)
def test_expert_success_statistical(name, shift):
    _assert_expert_rate(name, shift, episodes=300, seed0=100_000)


@pytest.mark.parametrize("shift", [None, "actuator_bias"], ids=["plain", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_expert_chunk_leaves_env_unchanged(name, shift):
    env, twin = make_env(name, shift=shift), make_env(name, shift=shift)
    env.reset(seed=21)
    twin.reset(seed=21)
    expert_steps(env, 2)
    expert_steps(twin, 2)
    u = env.unwrapped
    first = u.expert_action()
    before = snapshot(env)
    chunk = u.expert_chunk()
    assert_unchanged(env, before)
    assert chunk.shape == (16, u.embodiment_spec.action_dim) and chunk.dtype == np.float32
    assert all(env.action_space.contains(row) for row in chunk)
    np.testing.assert_array_equal(chunk[0], first)
    np.testing.assert_array_equal(u.expert_action(), first)
    np.testing.assert_array_equal(u.expert_chunk(5), chunk[:5])
    # the env still evolves exactly like an identical env that was never asked for a chunk
    a = mid_action(env)
    step_a, step_b = env.step(a), twin.step(a)
    assert_tree_equal(step_a, step_b, "step after expert_chunk")


@pytest.mark.parametrize("shift", [None, "actuator_bias"], ids=["plain", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_expert_chunk_is_the_expert_looked_ahead(name, shift):
    """Executing the chunk step by step, the expert proposes exactly the chunk's next row each time."""
    env = make_env(name, seed=4, shift=shift)
    env.reset()
    chunk = env.unwrapped.expert_chunk()
    for row in chunk:
        np.testing.assert_array_equal(env.unwrapped.expert_action(), row)
        _, _, term, trunc, _ = env.step(row)
        if term or trunc:
            break


def test_expert_chunk_zero_length():
    env = make_env("franka", seed=0)
    env.reset()
    try:
        chunk = env.unwrapped.expert_chunk(0)
    except ValueError:
        return
    assert chunk.shape == (0, 7)


@pytest.mark.xfail(
    strict=True,
    reason="BUG fleet/sim/hello.py:135-152 (HelloEnv._expert) the module docstring promises the navigation-function "
    "expert 'never gets stuck', but on seed 100217 it enters a 2-cycle between (-0.87, -0.39) and (-0.78, -0.33) "
    "in the narrow gap between two obstacles (blocked on the 0.1 m grid by the +0.05 m inflation; the 0.25 m "
    "look-ahead samples cells beyond it) and times out after 80 steps; 1 in 300 episodes (99.7%, the >=98% bar "
    "still holds). Suggested fix: detect no progress in the field value and step towards the lowest-valued "
    "neighbouring grid cell instead of the look-ahead direction",
)
def test_hello_expert_does_not_oscillate_in_a_narrow_gap():
    ok, steps = expert_episode(make_env("hello"), seed=100217)
    assert ok, f"hello expert failed seed 100217 after {steps} steps"


@pytest.mark.parametrize("name", ["franka", "aloha", "hello", "leap"])
def test_focus_points_at_the_named_object(name: str) -> None:
    """`focus()` (the privileged pretraining target) lands on a pixel of the named object's colour, and
    follows the image under `camera_offset`."""
    for seed in range(5):
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        f = env.unwrapped.focus()
        assert f.shape == (2,) and np.all(np.abs(f) <= 1.0)
        x, y = ((f + 1.0) * 32).astype(int)
        if name != "leap":  # leap's instruction names a shape, not a colour
            colour = next(w for w in obs["instruction"].split() if w in render.PALETTE)
            assert np.abs(obs["image"][y, x].astype(int) - render.PALETTE[colour]).max() < 40, (seed, colour)
        shifted = make_env(name, shift="camera_offset")
        shifted.reset(seed=seed)
        dx, dy = shifted.unwrapped.camera_shift
        assert np.allclose(shifted.unwrapped.focus() - f, np.array([dx, dy]) / 32.0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_expert_chunk_after_a_prefix_plans_from_where_the_prefix_leads(name):
    """expert_chunk(prefix=P) starts with P and continues with the expert from the state P leads to (what a
    perfect real-time-chunking policy returns); the env is unchanged."""
    env = make_env(name)
    env.reset(seed=5)
    expert_steps(env, 3)
    u = env.unwrapped
    own = u.expert_chunk()
    np.testing.assert_array_equal(u.expert_chunk(prefix=own[:3]), own)  # its own plan: the same chunk
    hold = np.repeat(u.hold_action()[None], 3, axis=0)
    before = snapshot(env)
    after = u.expert_chunk(prefix=hold)
    assert_unchanged(env, before)
    np.testing.assert_array_equal(after[:3], hold)
    twin = make_env(name)
    twin.reset(seed=5)
    expert_steps(twin, 3)
    for row in hold:
        twin.step(row)
    np.testing.assert_array_equal(after[3:], twin.unwrapped.expert_chunk(13))
    with pytest.raises(ValueError, match="prefix"):
        u.expert_chunk(4, prefix=own[:5])
