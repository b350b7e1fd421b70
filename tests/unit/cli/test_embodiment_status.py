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
    training = {"round": 1, "stage": "training", "steps": 1000, "done": 650, "elapsed_s": 81.4, "demos": 47}
    text = format_status({"bodies": {"so100": body(latched=False) | {"training": training}}})
    assert "  round 1: training, 650 / 1000 steps on 47 demos, 81 s so far" in text.splitlines()
    checking = training | {"stage": "checking", "done": 1000}
    text = format_status({"bodies": {"so100": body(latched=False) | {"training": checking}}})
    assert "  round 1: 1000 steps done, held-out check, 81 s so far" in text.splitlines()
    assert all(len(line) <= 80 for line in text.splitlines())


def test_the_timeline_since_the_add_is_one_line():
    timeline = {"robots": 7.2, "first_round": 58.1, "v1": 262.4, "first_policy_episode": 271.0}
    text = format_status({"bodies": {"so100": body(latched=False) | {"timeline": timeline}}})
    line = "  since the add: robots 7 s, round 1 58 s, v1 262 s, policy episode 271 s"
    assert line in text.splitlines() and all(len(x) <= 80 for x in text.splitlines())
