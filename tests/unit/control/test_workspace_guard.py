"""A body's own task-space wall (SafetyConfig.workspace_guard; so100's fingertip floor): what per-dimension
walls cannot state. The guard only shrinks steps, runs before and after the rate limits, and a guard that
misbehaves makes the layer hold instead of sending its output."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.control import SafetyConfig, SafetyLayer
from fleet.embodiments import CATALOG
from fleet.sim.so100 import JOINT_HIGH, JOINT_LOW, TABLE_FLOOR, forward, inverse, workspace_guard

SO100 = CATALOG["so100"]


def proprio_at(tip, roll=0.0) -> np.ndarray:
    return np.concatenate([inverse(np.asarray(tip, float), roll), [0.0, 0.0]])


def test_a_step_into_the_table_is_shrunk_to_the_floor_and_others_pass():
    p = proprio_at([0.0, 0.0, 0.02])
    down = np.array([0.0, -0.1, -0.1, 0.1, 0.0, 1.0])  # lift and elbow down: the fingertip dives
    assert forward(np.clip(p[:5] + down[:5], JOINT_LOW, JOINT_HIGH))[2] < TABLE_FLOOR
    out = workspace_guard(down, p)
    z = forward(np.clip(p[:5] + out[:5], JOINT_LOW, JOINT_HIGH))[2]
    assert TABLE_FLOOR <= z < TABLE_FLOOR + 0.005  # as far as allowed, not stopped short
    np.testing.assert_allclose(out[:5], down[:5] * (out[1] / down[1]))  # the same direction, shorter
    assert out[5] == 1.0  # the gripper is not the guard's business
    up = -down
    np.testing.assert_array_equal(workspace_guard(up, p), up)
    below = proprio_at([0.0, 0.0, -0.03])
    np.testing.assert_array_equal(workspace_guard(down, below)[:5], 0.0)  # below the floor: no deeper
    np.testing.assert_array_equal(workspace_guard(up, below), up)  # but out, yes


def test_over_random_states_and_steps_the_fingertip_never_ends_below_the_floor():
    rng = np.random.default_rng(0)
    for _ in range(500):
        p = proprio_at([rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.15), rng.uniform(-0.02, 0.1)])
        a = np.concatenate([rng.uniform(-0.1, 0.1, 5), [rng.uniform(-1, 1)]])
        out = workspace_guard(a, p)
        z0 = forward(p[:5])[2]
        z = forward(np.clip(p[:5] + out[:5], JOINT_LOW, JOINT_HIGH))[2]
        assert z >= min(TABLE_FLOOR, z0) - 1e-9
        assert np.all(np.abs(out) <= np.abs(a) + 1e-12)


def test_the_safety_layer_applies_the_guard_and_holds_when_it_misbehaves():
    p = proprio_at([0.0, 0.0, 0.02])
    down = np.array([0.0, -0.1, -0.1, 0.1, 0.0, 1.0])
    plain = SafetyLayer(SO100)
    guarded = SafetyLayer(SO100, SafetyConfig(workspace_guard=workspace_guard))
    np.testing.assert_array_equal(plain(down, proprio=p)[0], down)  # per-dimension limits alone let it dive
    sent, report = guarded(down, proprio=p)
    assert report.workspace > 0 and not report.held
    assert forward(p[:5] + sent[:5])[2] >= TABLE_FLOOR
    assert guarded.stats()["workspace"] == 1
    fresh = SafetyLayer(SO100, SafetyConfig(workspace_guard=workspace_guard))
    np.testing.assert_array_equal(fresh(down)[0], down)  # no reading: nothing to guard with
    nan = p.copy()
    nan[1] = np.nan
    assert fresh(down, proprio=nan)[1].non_finite  # a broken reading the guard needs: hold
    with pytest.raises(ValueError, match="proprio"):
        fresh(down, proprio=p[:3])

    def bigger(action, proprio):
        return action * 2

    rogue = SafetyLayer(SO100, SafetyConfig(workspace_guard=bigger))
    sent, _ = rogue(down, proprio=p)
    np.testing.assert_array_equal(sent, np.asarray(SO100.stop_action))  # not trusted: the stop action
