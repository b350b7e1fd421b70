"""CommandController: for random policy action sequences on every body (and a body with a jerk limit), every
setpoint stays inside the workspace and within the per-command-period velocity, acceleration and jerk bounds,
and a constant target is reached and held."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.control.command import CommandController, CommandLimits
from fleet.embodiments import EMBODIMENTS, CommandSpec, command_spec

NAMES = ("franka", "aloha", "hello", "leap")
SLACK = 1e-9


def _limits(name: str, jerk: bool) -> tuple[CommandLimits, float]:
    spec = EMBODIMENTS[name]
    hz = command_spec(name).command_hz or spec.control_hz
    cmd = None
    if jerk:  # a jerk bound that binds: full acceleration built up over ~5 command periods
        cmd = CommandSpec(hz, tuple(v * spec.control_hz * hz / 5 for v in spec.max_velocity))
    return CommandLimits(spec, hz, cmd), hz


def _check(xs: np.ndarray, lim: CommandLimits, start: np.ndarray, overrides: int = 0) -> None:
    low, high = np.array(lim.low), np.array(lim.high)
    assert (xs >= low - SLACK).all() and (xs <= high + SLACK).all()
    path = np.vstack([start, xs])
    v = np.diff(path, axis=0)
    assert (np.abs(v) <= np.array(lim.vel) * (1 + 1e-9) + SLACK).all(), np.abs(v).max(axis=0) / lim.vel
    acc = np.diff(np.vstack([np.zeros(len(start)), v]), axis=0)
    assert (np.abs(acc) <= np.array(lim.acc) * (1 + 1e-9) + SLACK).all(), np.abs(acc).max(axis=0) / lim.acc
    if lim.jerk is not None:
        jerk = np.diff(np.vstack([np.zeros(len(start)), acc]), axis=0)
        over = int((np.abs(jerk) > np.array(lim.jerk) * (1 + 1e-6) + SLACK).sum())
        assert over <= overrides, (over, overrides)  # every jerk excess is a counted override


@pytest.mark.parametrize("jerk", [False, True])
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_limits_hold_for_random_action_sequences(name, jerk, data):
    spec = EMBODIMENTS[name]
    lim, hz = _limits(name, jerk)
    n = data.draw(st.integers(2, 6), label="policy actions")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    low, high = np.array(spec.action_low), np.array(spec.action_high)
    # wild targets, also outside the workspace (the controller clips) and jumps across it in one period
    actions = rng.uniform(low - 0.2 * (high - low), high + 0.2 * (high - low), size=(n, spec.action_dim))
    start = rng.uniform(low, high)
    ctl = CommandController(lim, start, spec.dt)
    per = int(round(hz / spec.control_hz))
    xs = []
    t = 0.0
    for a in actions:
        ctl.set_target(a, t)
        for _ in range(per):
            t += 1.0 / hz
            xs.append(list(ctl.tick(t)))
    _check(np.array(xs), lim, start, ctl.jerk_overrides)
    if not jerk:
        assert ctl.jerk_overrides == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_constant_target_is_reached_and_held(name):
    spec = EMBODIMENTS[name]
    lim, hz = _limits(name, False)
    low, high = np.array(spec.action_low), np.array(spec.action_high)
    target = low + 0.7 * (high - low)
    ctl = CommandController(lim, low + 0.2 * (high - low), spec.dt)
    ctl.set_target(target, 0.0)
    t, xs = 0.0, []
    for _ in range(int(hz * 3)):  # 3 s
        t += 1.0 / hz
        xs.append(list(ctl.tick(t)))
    np.testing.assert_allclose(xs[-1], target, atol=1e-9)
    # and it never overshot the target on the way
    xs = np.array(xs)
    assert (xs <= target + 1e-9).all()


def test_interpolation_between_consecutive_actions_within_limits_is_exact():
    """A slow change (within every limit) is followed as the straight line between the two actions."""
    spec = EMBODIMENTS["leap"]
    lim, hz = _limits("leap", False)
    a0 = np.full(spec.action_dim, 0.3)
    a0[16:] = 0.0
    a1 = a0 + 0.01
    ctl = CommandController(lim, a0, spec.dt)
    ctl.set_target(a0, 0.0)
    ctl.set_target(a1, 0.0)
    per = int(hz / spec.control_hz)
    xs = [list(ctl.tick((k + 1) / hz)) for k in range(per)]
    # the acceleration ramp lags behind the line at first; the end of the period reaches the action
    np.testing.assert_allclose(xs[-1], a1, atol=2e-3)
    assert ctl.ticks == per
