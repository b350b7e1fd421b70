"""`fleet embodiment status`'s table: one line per added body, its rounds, and a latched robot named with the
command that resets it."""

from __future__ import annotations

from fleet.cli.onboard_cmds import format_status


def body(latched: bool) -> dict:
    robot = {"robot": "robot-so100-0", "policy_episodes": 4, "policy_successes": 3, "estop_latched": latched}
    other = {"robot": "robot-so100-1", "policy_episodes": 0, "policy_successes": 0, "estop_latched": False}
    return {"phase": "policy", "head_version": 2, "demos": 60, "robots": [robot, other], "rounds": []}


def test_a_latched_onboarding_robot_is_named_with_its_reset_command():
    text = format_status({"bodies": {"so100": body(latched=True)}})
    assert "e-stop latched: robot-so100-0; once clear: fleet estop reset robot-so100-0" in text
    assert "75%" in text and all(len(line) <= 80 for line in text.splitlines())
    assert "e-stop" not in format_status({"bodies": {"so100": body(latched=False)}})


def test_a_round_in_progress_shows_how_far_it_is():
    training = {"round": 1, "stage": "training", "steps": 1500, "done": 650, "elapsed_s": 81.4}
    text = format_status({"bodies": {"so100": body(latched=False) | {"training": training}}})
    assert "  round 1: training, 650 / 1500 steps, 81 s so far" in text.splitlines()
    checking = training | {"stage": "checking", "done": 1500}
    text = format_status({"bodies": {"so100": body(latched=False) | {"training": checking}}})
    assert "  round 1: 1500 steps done, held-out check, 81 s so far" in text.splitlines()
    assert all(len(line) <= 80 for line in text.splitlines())
