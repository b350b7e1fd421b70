"""SafetyLayer: properties over every registered embodiment, plus each constraint's exact behaviour."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleet.control import SafetyConfig, SafetyLayer
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec

NAMES = sorted(EMBODIMENTS)
# a body with an acceleration limit too (no builtin one has it), to check limits compose
ACCEL = dataclasses.replace(EMBODIMENTS["franka"], name="frankaacc", max_acceleration=(1.0,) * 3 + (2.0,) * 3 + (50.0,))
# a norm bound tighter than the per-dimension bounds imply (the builtin default never binds alone)
NORM = dataclasses.replace(EMBODIMENTS["aloha"], name="alohanorm", max_velocity_norm=5.0)
SPECS = {name: EMBODIMENTS[name] for name in NAMES} | {ACCEL.name: ACCEL, NORM.name: NORM}
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9  # the velocity bounds hold to this relative tolerance (float64 rounding of last + delta - last)
SPECIAL = [math.nan, math.inf, -math.inf, 1e300, -1e300]


def limits(spec: EmbodimentSpec, scale: float = 1.0):
    low, high = np.array(spec.action_low), np.array(spec.action_high)
    return low, high, np.array(spec.max_velocity) * spec.dt * scale, spec.velocity_norm_bound * spec.dt * scale


def assert_safe(spec: EmbodimentSpec, sent: np.ndarray, last: np.ndarray | None, scale: float = 1.0) -> None:
    low, high, vlim, nlim = limits(spec, scale)
    assert sent.shape == (spec.action_dim,) and np.isfinite(sent).all()
    assert np.all(sent >= low) and np.all(sent <= high), "outside the workspace"
    if last is not None:
        step = sent.astype(np.float64) - last
        assert np.all(np.abs(step) <= vlim * (1 + REL)), "per-dimension velocity exceeded"
        assert np.linalg.norm(step) <= nlim * (1 + REL), "velocity norm exceeded"


def stop_target(spec: EmbodimentSpec, last: np.ndarray | None) -> np.ndarray:
    """What holds aim for by default: the spec's stop action, else the last sent action, else zeros (clipped)."""
    if spec.stop_action is not None:
        return np.array(spec.stop_action)
    return last if last is not None else np.clip(np.zeros(spec.action_dim), spec.action_low, spec.action_high)


@st.composite
def requests(draw, spec: EmbodimentSpec, max_len: int = 10):
    """A sequence of (action in normalized units mapped to the spec's range with specials, force or None)."""
    n = draw(st.integers(1, max_len))
    u = draw(hnp.arrays(np.float64, (n, spec.action_dim), elements=st.floats(-3, 3) | st.sampled_from(SPECIAL)))
    low, high = np.array(spec.action_low), np.array(spec.action_high)
    with np.errstate(invalid="ignore", over="ignore"):
        actions = (low + high) / 2 + u * (high - low) / 2
    forces = draw(st.lists(st.none() | st.floats(0, 2 * spec.max_force), min_size=n, max_size=n))
    return list(zip(actions, forces, strict=True))


@st.composite
def in_limit_walk(draw, spec: EmbodimentSpec, margin: float = 0.0, max_len: int = 8):
    """Actions each inside the workspace and within 90% of every velocity bound of the one before."""
    low, high, vlim, nlim = limits(spec)
    inner_lo, inner_hi = low + margin * (high - low), high - margin * (high - low)
    frac = hnp.arrays(np.float64, spec.action_dim, elements=st.floats(0, 1))
    x = inner_lo + draw(frac) * (inner_hi - inner_lo)
    walk = [x]
    for _ in range(draw(st.integers(0, max_len))):
        step = (draw(frac) * 1.8 - 0.9) * vlim
        step *= min(1.0, 0.9 * nlim / max(np.linalg.norm(step), 1e-300))
        x = np.clip(x + step, inner_lo, inner_hi)  # clipping only shortens the step
        walk.append(x)
    return walk


@pytest.mark.parametrize("name", list(SPECS))
@PROPS
@given(data=st.data(), scale=st.sampled_from([1.0, 0.5]), contact=st.sampled_from([None, 0.5]))
def test_output_always_inside_bounds_and_velocity_limits(name, data, scale, contact):
    spec = SPECS[name]
    layer = SafetyLayer(spec, SafetyConfig(velocity_scale=scale, contact_stop=contact))
    last = None
    for action, force in data.draw(requests(spec)):
        sent, report = layer(action, force=force)
        if report.estop or report.contact_stop:  # brakes at once to the stop action: exempt from the rate limits
            assert_safe(spec, sent, None)
            assert np.array_equal(sent, stop_target(spec, last))
            layer.reset_estop()
        else:
            assert_safe(spec, sent, last, scale)
        last = sent.astype(np.float64)
    assert layer.stats()["calls"] > 0


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]))
def test_in_limit_actions_pass_bit_identical(name, data, dtype):
    spec = EMBODIMENTS[name]
    layer = SafetyLayer(spec)
    # float32 rounding moves a value by ~1e-8 of its size, so keep float32 walks a hair inside the bounds
    margin = 1e-6 if dtype is np.float32 else 0.0
    for x in data.draw(in_limit_walk(spec, margin)):
        request = x.astype(dtype)
        sent, report = layer(request, force=0.5 * spec.max_force)
        assert sent.dtype == request.dtype and sent.tobytes() == request.tobytes()
        assert not report.modified and report.fired == () and report.max_change == 0.0
        assert sent is not request  # a copy: the caller cannot alter the layer's memory through it
    assert layer.stats()["modified"] == 0


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data(), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_is_a_counted_fault_that_holds(name, data, bad):
    spec = EMBODIMENTS[name]
    layer = SafetyLayer(spec)
    walk = data.draw(in_limit_walk(spec))
    for x in walk:
        layer(x)
    request = walk[-1].copy()
    request[data.draw(st.integers(0, spec.action_dim - 1))] = bad
    target, last = stop_target(spec, walk[-1]), walk[-1]
    low, high, vlim, _ = limits(spec)
    # every dimension ramps to the hold target within the velocity bounds: enough ticks to cover the range
    ticks = int(np.ceil(np.max((high - low) / vlim))) + 2
    for _ in range(ticks):
        sent, report = layer(request)
        assert_safe(spec, sent, last)
        assert np.all(np.abs(sent - target) <= np.abs(last - target) + 1e-12)  # never away from the target
        assert report.non_finite and report.fault and report.held and report.max_change is None
        assert "non_finite" in report.fired
        last = sent
    assert np.allclose(sent, target, rtol=0, atol=1e-12)
    assert layer.stats()["non_finite"] == ticks


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=st.data(), over=st.floats(1.0001, 100.0), n_after=st.integers(1, 5))
def test_estop_latched_until_reset(name, data, over, n_after):
    spec = EMBODIMENTS[name]
    layer = SafetyLayer(spec)
    walk = data.draw(in_limit_walk(spec))
    for x in walk:
        layer(x)
    held = stop_target(spec, walk[-1])
    _, report = layer(walk[0], force=[over * spec.max_force, 0.0, 0.0])  # a force vector: its norm counts
    assert report.estop and report.estop_tripped and layer.estopped
    for action, _ in data.draw(requests(spec, max_len=n_after)):
        sent, report = layer(action, force=0.0)  # calm readings do not release the latch
        assert np.array_equal(sent, held) and report.estop and not report.estop_tripped
    layer.reset_estop()
    sent, report = layer(held)
    assert not layer.estopped and not report.estop and not report.modified
    assert layer.stats()["estop_trips"] == 1


def test_first_fault_sends_neutral_clipped_into_the_workspace():
    leap = EMBODIMENTS["leap"]  # zeros lie on its lower bound for the fingers
    sent, report = SafetyLayer(leap)(np.full(leap.action_dim, np.nan))
    assert np.array_equal(sent, np.zeros(leap.action_dim)) and report.non_finite
    neutral = tuple([2.0] * 16 + [-0.2] * 8)
    sent, _ = SafetyLayer(leap, SafetyConfig(neutral_action=neutral))(None)
    assert np.array_equal(sent, [1.6] * 16 + [-0.2] * 8)  # clipped to the workspace


def test_missing_and_stale_actions_hold():
    spec = EMBODIMENTS["leap"]  # position targets, no stop action: hold = stay at the last sent target
    assert spec.stop_action is None
    layer = SafetyLayer(spec)
    first = np.full(24, 0.3)
    layer(first)
    sent, report = layer(None)
    assert np.array_equal(sent, first) and report.missing and report.fault
    horizon = spec.chunk_size * spec.dt
    assert layer.max_action_age_s == pytest.approx(horizon)
    sent, report = layer(np.full(24, 0.4), age_s=horizon * 1.01)
    assert np.array_equal(sent, first) and report.stale and report.held
    sent, report = layer(np.full(24, 0.4), age_s=horizon * 0.99)
    assert np.array_equal(sent, np.full(24, 0.4)) and not report.stale
    assert layer.stats()["stale"] == 1 and layer.stats()["missing"] == 1


def test_workspace_then_velocity_values_are_exact():
    spec = EMBODIMENTS["hello"]  # low -0.6/-0.6/-1.5, high 0.6/0.6/1.5, per tick step 0.48/0.48/1.2
    layer = SafetyLayer(spec)
    sent, report = layer(np.array([5.0, -0.1, 0.0]))
    assert np.array_equal(sent, [0.6, -0.1, 0.0]) and report.workspace == pytest.approx(4.4)
    sent, report = layer(np.array([-5.0, -0.1, 0.0]))  # clipped to -0.6, then one step of 0.48 from 0.6
    assert np.allclose(sent, [0.12, -0.1, 0.0], atol=1e-15) and report.fired == ("workspace", "velocity")
    assert report.velocity == pytest.approx(0.72) and report.max_change == pytest.approx(5.12)
    layer.velocity_scale = 0.5
    sent, _ = layer(np.array([-5.0, -0.1, 0.0]))
    assert np.allclose(sent, [0.12 - 0.24, -0.1, 0.0], atol=1e-15)


def test_norm_bound_scales_the_whole_step():
    spec = dataclasses.replace(EMBODIMENTS["hello"], name="hellonorm", max_velocity_norm=1.0)  # 0.2 per tick
    layer = SafetyLayer(spec)
    layer(np.zeros(3))
    sent, report = layer(np.array([0.3, 0.4, 0.0]))  # step norm 0.5 -> scaled by 0.4, direction kept
    assert np.allclose(sent, [0.12, 0.16, 0.0], atol=1e-15) and report.velocity == pytest.approx(0.24)


def test_acceleration_limit_and_holds_ignore_it():
    spec = dataclasses.replace(EMBODIMENTS["hello"], name="helloacc", max_acceleration=(2.0, 2.0, 2.0))
    layer = SafetyLayer(spec)  # dt 0.2: the step may change by 2 * 0.04 = 0.08 per tick
    layer(np.zeros(3))
    sent, report = layer(np.array([0.3, 0.0, 0.0]))  # prev step 0 -> at most 0.08
    assert np.allclose(sent, [0.08, 0, 0]) and report.acceleration == pytest.approx(0.22) and report.velocity == 0
    sent, _ = layer(np.array([0.3, 0.0, 0.0]))
    assert np.allclose(sent, [0.24, 0, 0])  # step 0.16 = 0.08 + 0.08
    sent, report = layer(None)  # stopping (hello's stop action is zero velocity) is never delayed by it
    assert np.array_equal(sent, [0.0, 0.0, 0.0]) and report.acceleration == 0


def test_stop_action_for_velocity_commands():
    spec = EMBODIMENTS["hello"]
    layer = SafetyLayer(spec, SafetyConfig(stop_action=(0.0, 0.0, 0.0)))
    layer(np.array([0.6, 0.0, 0.0]))
    sent, report = layer(np.array([np.nan, 0.0, 0.0]))  # a fault ramps down within the velocity limit
    assert np.allclose(sent, [0.12, 0.0, 0.0]) and report.non_finite
    sent, _ = layer(np.array([0.6, 0.0, 0.0]))
    sent, report = layer(np.array([0.6, 0.0, 0.0]), force=1e3)  # an e-stop brakes at once
    assert np.array_equal(sent, np.zeros(3)) and report.estop


def test_spec_stop_action_is_the_default_hold_for_delta_commands():
    spec = EMBODIMENTS["franka"]  # end-effector deltas: repeating the last one would keep moving
    layer = SafetyLayer(spec)
    layer(np.array([0.03, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
    sent, report = layer(None)  # ramps to the stop action: translation 0, gripper towards closed
    assert np.allclose(sent, [0.0] * 6 + [0.0]) and report.held
    sent, report = layer(np.zeros(7), force=spec.max_force * 2)
    assert np.array_equal(sent, spec.stop_action) and report.estop
    override = SafetyLayer(spec, SafetyConfig(stop_action=(0.0,) * 7))
    _, _ = override(np.zeros(7), force=spec.max_force * 2)
    assert np.array_equal(override.last_sent, np.zeros(7))


def test_nan_force_trips_estop():
    layer = SafetyLayer(EMBODIMENTS["franka"])
    _, report = layer(np.zeros(7), force=math.nan)
    assert report.estop and layer.estopped


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": np.zeros(6)}, r"action: expected .*shape \(7,\)"),
        ({"action": np.zeros((1, 7))}, r"shape \(7,\).*got shape \(1, 7\)"),
        ({"action": np.array(["a"] * 7)}, "action"),
        ({"action": np.zeros(7), "force": np.zeros((2, 3))}, "force"),
        ({"action": np.zeros(7), "age_s": -1.0}, "age_s"),
    ],
)
def test_bad_input_raises_and_leaves_state_unchanged(kwargs, match):
    layer = SafetyLayer(EMBODIMENTS["franka"])
    layer(np.full(7, 0.01))
    before, counts = layer.last_sent, layer.stats()
    with pytest.raises(ValueError, match=match):
        layer(**kwargs)
    assert np.array_equal(layer.last_sent, before) and layer.stats() == counts and not layer.estopped


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"velocity_scale": 0.0}, "velocity_scale"),
        ({"velocity_scale": 1.5}, "velocity_scale"),
        ({"max_action_age_s": -1.0}, "max_action_age_s"),
        ({"stop_action": (math.nan,)}, "stop_action"),
        ({"neutral_action": "zero"}, "neutral_action"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SafetyConfig(**kwargs)


def test_config_vector_length_is_checked_against_the_spec():
    with pytest.raises(ValueError, match=r"stop_action: expected 7"):
        SafetyLayer(EMBODIMENTS["franka"], SafetyConfig(stop_action=(0.0, 0.0)))
    with pytest.raises(ValueError, match="velocity_scale"):
        SafetyLayer(EMBODIMENTS["franka"]).velocity_scale = 0.0


def test_report_to_dict_is_json_and_counters_add_up():
    layer = SafetyLayer(EMBODIMENTS["franka"])
    layer(np.zeros(7))
    _, report = layer(np.full(7, 1.0), force=3.0)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["fired"] == ["workspace", "velocity"] and d["force_norm"] == 3.0 and d["modified"] is True
    stats = layer.stats()
    assert stats["calls"] == 2 and stats["workspace"] == 1 and stats["velocity"] == 1 and stats["modified"] == 1


def test_reset_seeds_the_velocity_limit_and_keeps_the_estop():
    spec = EMBODIMENTS["franka"]
    layer = SafetyLayer(spec)
    layer(np.zeros(7), force=1e3)
    layer.reset(last_action=np.full(7, 0.05))
    assert layer.estopped  # only reset_estop() clears the latch
    layer.reset_estop()
    sent, _ = layer(np.full(7, -0.05))
    assert np.allclose(sent[:3], 0.05 - 0.04)  # limited from the seeded position, not jumped to


@pytest.mark.parametrize("name", ["franka", "aloha", ACCEL.name])
def test_preview_is_what_the_next_calls_send_and_changes_nothing(name):
    """preview(plan) equals the actions the layer sends for the plan on the next ticks (rate limits and walls
    included), and leaves the layer (last sent action, counters) as it was."""
    spec = SPECS[name]
    rng = np.random.default_rng(3)
    low, high = np.asarray(spec.action_low), np.asarray(spec.action_high)
    layer = SafetyLayer(spec)
    layer(rng.uniform(low, high))
    plan = rng.uniform(low * 1.2, high * 1.2, size=(6, spec.action_dim))  # steps far over the rate limits
    proprio = np.zeros(spec.proprio_dim)
    before_last, before_counts = layer.last_sent, layer.stats()
    preview = layer.preview(plan, proprio)
    assert np.array_equal(layer.last_sent, before_last) and layer.stats() == before_counts
    sent = np.array([layer(a, proprio=proprio)[0] for a in plan], np.float64)
    assert np.array_equal(preview, sent)
    assert not np.allclose(preview, plan)  # the limits did bend this plan
    with pytest.raises(ValueError, match="actions: expected shape"):
        layer.preview(plan[0])
