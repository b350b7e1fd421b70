"""The fifth body, so100: a gymnasium env as real as the other four, kept out of the fleet's registry."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from fleet.embodiments import CATALOG, EMBODIMENTS, get_embodiment
from fleet.sim import SHIFTS, make_env
from fleet.sim.so100 import forward, inverse
from fleet.sim.teleop import Teleoperator
from tests.mocks.sim_helpers import assert_unchanged, expert_success, snapshot
from tests.unit.sim.helpers import expert_steps


def test_not_in_the_registry_until_added():
    assert "so100" not in EMBODIMENTS and "so100" in CATALOG
    assert get_embodiment("so100") is CATALOG["so100"]
    spec = CATALOG["so100"]
    # a different action space from every pretrained body
    assert all((s.action_dim, s.proprio_dim) != (spec.action_dim, spec.proprio_dim) for s in EMBODIMENTS.values())


def test_check_env():
    env = make_env("so100", seed=0)
    check_env(env.unwrapped, skip_render_check=False)
    obs, _ = env.reset(seed=3)
    assert obs["image"].shape == (64, 64, 3) and obs["proprio"].shape == (7,)
    assert obs["instruction"].startswith("pick up the ")  # franka's instructions: the words carry over


@pytest.mark.parametrize("shift", [None, "novel_object+lighting+camera_offset+distractors", "actuator_bias"])
def test_expert_succeeds(shift):
    ok, n, failed = expert_success(make_env("so100", shift=shift), range(3000, 3030))
    assert ok / n >= 0.98, f"shift={shift}: {ok}/{n}, failing seeds {failed}"


def test_kinematics_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        target = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.0, 0.15)])
        np.testing.assert_allclose(forward(inverse(target, 0.0)), target, atol=1e-6)


def test_grasp_needs_the_roll_aligned():
    """Closing on the object with the jaw turned 45 degrees from the table's axes grasps nothing."""
    env = make_env("so100", seed=11)
    env.reset()
    u = env.unwrapped
    s = u._state
    goal = s["objects"][s["target"]]
    s["q"] = inverse(np.array([goal[0], goal[1], 0.01]), 0.0)
    s["q"][4] = s["q"][0] + 0.8
    for _ in range(4):
        env.step(np.array([0, 0, 0, 0, 0, 1.0], np.float32))
    assert s["holding"] == -1
    s["q"][4] = s["q"][0]
    s["grip"] = 0.0
    for _ in range(4):
        env.step(np.array([0, 0, 0, 0, 0, 1.0], np.float32))
    assert s["holding"] == s["target"]


def test_pushing_into_the_table_reports_force_and_stalls():
    env = make_env("so100", seed=2)
    env.reset()
    u = env.unwrapped
    goal = u._state["objects"][0]
    u._state["q"] = inverse(np.array([goal[0] + 0.06, goal[1], 0.002]), 0.0)
    q0 = u._state["q"].copy()
    _, _, _, _, info = env.step(np.array([0, -0.1, 0, 0, 0, -1.0], np.float32))
    assert info["force"] > 0
    np.testing.assert_array_equal(u._state["q"], q0)


def test_teleoperator_demonstrates_and_leaves_env_unchanged():
    env = make_env("so100", seed=4, shift="actuator_bias")
    env.reset()
    expert_steps(env, 2)
    before = snapshot(env)
    chunk = Teleoperator().demonstrate(env)
    assert chunk.shape == (16, 6) and chunk.dtype == np.float32
    assert_unchanged(env, before)
    np.testing.assert_array_equal(chunk[0], env.unwrapped.expert_action())


@pytest.mark.slow
@pytest.mark.parametrize("shift", [None, *SHIFTS])
def test_expert_success_statistical(shift):
    ok, n, failed = expert_success(make_env("so100", shift=shift), range(100_000, 100_300))
    assert ok / n >= 0.98, f"shift={shift}: {ok}/{n}, failing seeds {failed[:20]}"
