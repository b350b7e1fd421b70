"""Bad actions are rejected with a clear error and leave the env exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.sim import make_env
from tests.mocks.sim_helpers import NAMES, assert_tree_equal, assert_unchanged, mid_action, snapshot
from tests.unit.sim.helpers import expert_steps


def _bad_action(kind: str, env):
    u = env.unwrapped
    d = u.embodiment_spec.action_dim
    a = mid_action(env)
    if kind == "short":
        return a[:-1], rf"shape \({d},\)"
    if kind == "long":
        return np.concatenate([a, a[:1]]), rf"shape \({d},\)"
    if kind == "2d":
        return a[None, :], rf"shape \({d},\)"
    if kind == "scalar":
        return 0.0, rf"shape \({d},\)"
    if kind == "none":
        return None, rf"shape \({d},\)"
    if kind == "nan":
        a[1] = np.nan
        return a, r"non-finite value at dims \[1\]"
    if kind == "inf":
        a[0] = np.inf
        return a, r"non-finite value at dims \[0\]"
    if kind == "neg_inf_list":
        b = a.tolist()
        b[d - 1] = float("-inf")
        return b, rf"non-finite value at dims \[{d - 1}\]"
    if kind == "too_high":
        a[d - 1] = u._high[d - 1] + 0.5 * (u._high[d - 1] - u._low[d - 1])
        return a, rf"dim {d - 1} \({u.embodiment_spec.dim_names[d - 1]}\).*outside"
    if kind == "too_low":
        a[0] = u._low[0] - 1.0
        return a, rf"dim 0 \({u.embodiment_spec.dim_names[0]}\).*outside"
    if kind == "string":
        return "forward", r"got str"
    if kind == "dict":
        return {"dx": 0.0}, r"got dict"
    raise AssertionError(kind)


BAD_KINDS = [
    "short",
    "long",
    "2d",
    "scalar",
    "none",
    "nan",
    "inf",
    "neg_inf_list",
    "too_high",
    "too_low",
    "string",
    "dict",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_action_rejected_and_state_unchanged(name, kind):
    env, twin = make_env(name, seed=8), make_env(name, seed=8)
    env.reset()
    twin.reset()
    expert_steps(env, 3)
    expert_steps(twin, 3)
    before = snapshot(env)
    bad, message = _bad_action(kind, env)
    with pytest.raises(ValueError, match=message) as exc:
        env.step(bad)
    assert name in str(exc.value)
    with pytest.raises(ValueError):
        env.unwrapped.validate_action(bad)
    assert_unchanged(env, before)
    # the env continues exactly like one that never saw the bad action
    for _ in range(3):
        action = twin.unwrapped.expert_action()
        assert_tree_equal(env.step(action), twin.step(action), "step after rejected action")


def test_action_of_numeric_strings_rejected():
    env = make_env("franka", seed=0)
    env.reset()
    with pytest.raises(ValueError):
        env.step(["0.0"] * 7)


@pytest.mark.parametrize("name", NAMES)
def test_validate_action_accepts_edges_and_other_dtypes(name):
    env = make_env(name, seed=0)
    env.reset()
    u = env.unwrapped
    for a in (u._low.copy(), u._high.copy(), mid_action(env).astype(np.float64), mid_action(env).tolist()):
        out = u.validate_action(a)
        assert out.dtype == np.float32 and out.shape == u._low.shape
        np.testing.assert_allclose(out, np.asarray(a, dtype=np.float32))
    env.step(u._high.astype(np.float64))
