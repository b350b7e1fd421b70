"""fleet.validate: the one check at every boundary; and the EpisodeOutcome record built with it."""

from __future__ import annotations

import math

import pytest

from fleet.protocol import EpisodeOutcome
from fleet.validate import check_bool, check_choice, check_int, check_number, check_str, is_int, is_number


def test_bools_are_neither_ints_nor_numbers():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(2.5) and is_number(2) and not is_number(False) and not is_number("1")
    with pytest.raises(ValueError, match=r"^steps: expected an int >= 1, got True$"):
        check_int("steps", True, lo=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("n", 0, lo=1), "n: expected an int >= 1, got 0"),
        (lambda: check_int("n", 9, lo=0, hi=8), "n: expected an int in [0, 8], got 9"),
        (lambda: check_int("n", 9, hi=8), "n: expected an int <= 8, got 9"),
        (lambda: check_number("x", math.nan), "x: expected a finite number, got nan"),
        (lambda: check_number("x", -1, lo=0), "x: expected a finite number >= 0, got -1"),
        (lambda: check_bool("b", "yes"), "b: expected true or false, got 'yes'"),
        (lambda: check_str("s", "  "), "s: expected a non-empty string, got '  '"),
        (lambda: check_choice("route", ["direct"], ("direct", "handle")), "route: expected one of 'direct', 'handle'"),
        (lambda: check_int("n", 1.5, expected="a whole number of ticks"), "n: expected a whole number of ticks"),
    ],
)
def test_each_check_names_the_field_what_it_wanted_and_what_came(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message)


def test_checks_return_the_value_and_take_the_callers_error_type():
    class RecordError(ValueError):
        pass

    assert check_int("n", 4, lo=0) == 4 and check_number("x", 3) == 3.0 and isinstance(check_number("x", 3), float)
    assert check_number("x", math.inf, finite=False) == math.inf
    assert check_str("s", "", nonempty=False) == "" and check_choice("c", "a", {"a"}) == "a"
    with pytest.raises(RecordError, match="n: expected"):
        check_int("n", "4", error=RecordError)


def outcome(**changes):
    d = {"robot_id": "robot-franka-0", "embodiment": "franka", "episode": 3, "success": True, "head_version": 2}
    d |= {"head_versions": [2], "interventions": 1, "ticks": 20, "shift": "", "t": 1.0}
    return d | changes


def test_an_episode_outcome_round_trips_and_refuses_bad_fields():
    o = EpisodeOutcome.from_dict(outcome())
    assert o.head_versions == (2,) and EpisodeOutcome.from_dict(o.to_dict()) == o
    assert EpisodeOutcome.from_dict(outcome(head_version=None, head_versions=[1, 2])).head_version is None
    for bad, field in [
        (outcome(success=1), "outcome.success"),
        (outcome(head_version=True), "outcome.head_version"),
        (outcome(interventions=-1), "outcome.interventions"),
        (outcome(head_versions="2"), "outcome.head_versions"),
        (outcome(extra=1), "only EpisodeOutcome fields"),
    ]:
        with pytest.raises(ValueError, match=field):
            EpisodeOutcome.from_dict(bad)
