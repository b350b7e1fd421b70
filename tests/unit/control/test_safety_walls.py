"""Position walls (`EmbodimentSpec.position_limits`): the safety layer keeps proprio + delta command inside them.

franka's wall keeps the end effector from being commanded more than 1 cm into the table. Without it the shipped
policy tripped the force e-stop in 8 of 300 unseen episodes (a descend command repeated at the table: 30-39 N
against the 30 N limit), so a live franka latched its e-stop within minutes of `fleet up`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.control import SafetyConfig, SafetyLayer
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec
from fleet.policy.checkpoint import _spec_mismatch
from fleet.policy.evaluate import evaluate
from fleet.sim import make_env

FRANKA = EMBODIMENTS["franka"]
FLOOR, CEILING = -0.01, 0.3
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def franka_proprio(z: float) -> np.ndarray:
    return np.array([0.0, 0.0, z, 0.0, 0.0, 0.0, 0.0, 0.0], np.float64)


def test_franka_has_the_table_wall():
    assert FRANKA.position_limits == ((2, 2, FLOOR, CEILING),)
    assert all(not EMBODIMENTS[n].position_limits for n in EMBODIMENTS if n != "franka")


@PROPS
@given(
    z=st.floats(-0.5, 0.8),
    action=st.lists(st.floats(-0.08, 0.08), min_size=7, max_size=7),
    last=st.none() | st.lists(st.floats(-0.05, 0.05), min_size=7, max_size=7),
)
def test_the_commanded_height_stays_inside_the_wall(z, action, last):
    layer = SafetyLayer(FRANKA)
    if last is not None:
        layer.reset(last_action=np.array(last))
    sent, report = layer(np.array(action), proprio=franka_proprio(z))
    if FLOOR <= z <= CEILING:
        assert FLOOR - 1e-12 <= z + sent[2] <= CEILING + 1e-12
    elif z < FLOOR:  # below the wall (cannot happen in the sim): only upwards, as fast as the bound allows
        assert sent[2] > 0 and (z + sent[2] >= FLOOR - 1e-12 or sent[2] == FRANKA.action_high[2])
    else:
        assert sent[2] < 0 and (z + sent[2] <= CEILING + 1e-12 or sent[2] == FRANKA.action_low[2])
    assert np.all(sent >= np.array(FRANKA.action_low)) and np.all(sent <= np.array(FRANKA.action_high))
    # the other dimensions are exactly what the layer sends without the wall (unless the norm of the whole
    # step was scaled, which couples them)
    bare = SafetyLayer(FRANKA)
    if last is not None:
        bare.reset(last_action=np.array(last))
    plain, plain_report = bare(np.array(action))
    others = [i for i in range(7) if i != 2]
    if report.velocity == 0 and plain_report.velocity == 0:
        assert np.array_equal(np.asarray(sent)[others], np.asarray(plain)[others])


def test_a_command_inside_the_wall_passes_bit_identical():
    layer = SafetyLayer(FRANKA)
    request = np.array([0.01, -0.01, -0.02, 0.0, 0.0, 0.0, -1.0], np.float32)
    sent, report = layer(request, proprio=franka_proprio(0.05))
    assert sent.tobytes() == request.tobytes() and report.fired == ()


def test_descending_at_the_table_is_clipped_and_counted_as_workspace():
    layer = SafetyLayer(FRANKA)
    layer.reset(last_action=np.array([0, 0, -0.05, 0, 0, 0, -1.0]))
    sent, report = layer(np.array([0, 0, -0.05, 0, 0, 0, -1.0]), proprio=franka_proprio(0.0))
    assert sent[2] == pytest.approx(FLOOR) and report.workspace == pytest.approx(0.04)
    assert report.fired == ("workspace",) and layer.stats()["workspace"] == 1


def test_the_wall_wins_over_the_rate_limit():
    """The velocity limit moves a command towards the last one; it never carries it through the wall."""
    layer = SafetyLayer(FRANKA)
    layer.reset(last_action=np.array([0, 0, -0.05, 0, 0, 0, -1.0]))
    # at the wall itself: only dz >= 0 is allowed, a change of 0.05 > 0.04 per tick allowed by the rate limit
    sent, report = layer(np.array([0, 0, -0.05, 0, 0, 0, -1.0]), proprio=franka_proprio(FLOOR))
    assert sent[2] == pytest.approx(0.0) and report.workspace > 0


def test_in_the_sim_a_policy_that_keeps_descending_never_trips_the_estop():
    """End to end on the franka sim: dz = -0.05 every tick at the table. With the proprio the force stays at
    8 N; without it (no walls) the first push at the table reads 32 N or more and latches the e-stop."""
    for walls in (True, False):
        env = make_env("franka")
        obs, _ = env.reset(seed=3)
        layer, force, peak = SafetyLayer(FRANKA), 0.0, 0.0
        for _ in range(12):
            push = np.array([0, 0, -0.05, 0, 0, 0, -1.0])
            sent, _ = layer(push, force=force, proprio=obs["proprio"] if walls else None)
            obs, _, _, _, info = env.step(np.asarray(sent, np.float32))
            force = info["force"]
            peak = max(peak, force)
        if walls:
            assert peak <= 800 * 0.01 + 1e-4 and not layer.estopped  # float32 commands: 1e-9 m
        else:
            assert peak > FRANKA.max_force and layer.estopped


def test_evaluate_counts_estop_trips_as_failures():
    """`evaluate` feeds each step's contact force to the safety layer: a policy that slams down trips the
    e-stop when the wall is gone (a spec copy without it) and the episode fails; with the wall it does not."""

    def slam(observations, names):
        return [np.tile(np.array([0, 0, -0.05, 0, 0, 0, -1.0], np.float32), (16, 1)) for _ in observations]

    walled = evaluate(slam, "franka", 2, n_envs=2)
    assert walled.estop_trips == 0
    nowall = dataclasses.replace(FRANKA, position_limits=())
    from fleet import embodiments

    embodiments.EMBODIMENTS["franka"] = nowall
    try:
        bare = evaluate(slam, "franka", 2, n_envs=2)
    finally:
        embodiments.EMBODIMENTS["franka"] = FRANKA
    assert bare.estop_trips == 2 and bare.success_rate == 0.0 and bare.to_dict()["estop_trips"] == 2


def test_bad_proprio_is_named_and_changes_nothing():
    layer = SafetyLayer(FRANKA)
    layer(np.full(7, 0.01))
    before, counts = layer.last_sent, layer.stats()
    with pytest.raises(ValueError, match=r"proprio: expected .*shape \(8,\)"):
        layer(np.zeros(7), proprio=np.zeros(3))
    assert np.array_equal(layer.last_sent, before) and layer.stats() == counts


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_height_holds(bad):
    layer = SafetyLayer(FRANKA)
    sent, report = layer(np.full(7, 0.01), proprio=franka_proprio(bad))
    assert report.held and report.non_finite and np.array_equal(sent, np.array(FRANKA.stop_action))
    # a non-finite reading in a dimension no wall reads does not matter
    reading = franka_proprio(0.1)
    reading[0] = bad
    _, report = layer(np.zeros(7), proprio=reading)
    assert not report.non_finite


@pytest.mark.parametrize(
    ("walls", "match"),
    [
        ("z", "position_limits"),
        (((2, 2, 0.1),), "position_limits"),
        (((7, 2, 0.0, 1.0),), r"action indices in \[0, action_dim=7\)"),
        (((2, 8, 0.0, 1.0),), r"proprio indices in \[0, proprio_dim=8\)"),
        (((2, 2, 1.0, 0.0),), "low < high"),
        (((2, 2, math.nan, 1.0),), "low < high"),
        (((2, 2, 0.0, 1.0), (2, 1, 0.0, 1.0)), "one wall per action dimension"),
    ],
)
def test_spec_validation_names_the_field(walls, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(FRANKA, name="frankawall", position_limits=walls)


def test_spec_round_trip_and_old_checkpoints():
    assert EmbodimentSpec.from_dict(FRANKA.to_dict()) == FRANKA
    stored = FRANKA.to_dict()
    stored.pop("position_limits")  # written before the field existed: takes the registry's
    assert _spec_mismatch(stored, FRANKA) is None
    stored["position_limits"] = [[2, 2, -0.05, 0.3]]  # written with another wall: refused, named
    assert "position_limits" in _spec_mismatch(stored, FRANKA)


def test_a_contact_stop_brakes_for_one_tick_and_does_not_latch():
    """With contact_stop=0.5 (off by default), a force above half of max_force (under the e-stop's limit) sends
    the stop action at once on that tick; the next tick goes on as usual. A body without a stop action (leap:
    position targets) has none."""
    hello = EMBODIMENTS["hello"]
    on = SafetyConfig(contact_stop=0.5)
    layer = SafetyLayer(hello, on)
    layer.reset(last_action=np.array([0.3, 0.0, 0.0]))
    go = np.array([0.3, 0.0, 0.0])
    sent, report = layer(go, force=0.5 * hello.max_force)  # at the threshold: not above it
    assert not report.contact_stop and np.array_equal(sent, go)
    sent, report = layer(go, force=0.6 * hello.max_force)
    assert report.contact_stop and report.held and not report.estop and np.array_equal(sent, hello.stop_action)
    assert report.fired[0] == "contact_stop" and layer.stats()["contact_stops"] == 1
    sent, report = layer(go, force=0.0)
    assert not report.held and not layer.estopped and sent[0] > 0  # ramps back up, within the rate limit
    off = SafetyLayer(hello)  # off by default
    assert not off(go, force=0.9 * hello.max_force)[1].held
    leap = EMBODIMENTS["leap"]
    assert not SafetyLayer(leap, on)(np.full(leap.action_dim, 0.5), force=0.9 * leap.max_force)[1].held


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, math.nan, "half"])
def test_contact_stop_config_is_validated(bad):
    with pytest.raises(ValueError, match=r"SafetyConfig.contact_stop: expected None or a share of max_force"):
        SafetyConfig(contact_stop=bad)
