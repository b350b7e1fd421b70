"""fleet.names: the Ray names every part of the fleet is found by."""

from __future__ import annotations

from fleet import names


def test_names_are_the_ones_a_running_fleet_uses() -> None:
    assert (names.NAMESPACE, names.CONTROLLER, names.REPLAY, names.HEADS, names.LEARNER, names.APP) == (
        "fleet",
        "fleet-controller",
        "fleet-replay",
        "fleet-heads",
        "fleet-learner",
        "fleet-policy",
    )
    assert names.robot_name("franka", 3) == "robot-franka-3"
    assert names.robot_name("franka", 3).startswith(names.robot_prefix("franka"))
    assert names.robot_prefix("franka").startswith(names.ROBOT_PREFIX)
    assert names.GATEWAY_PREFIX == "policy-gateway-"
