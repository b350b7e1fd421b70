"""The learner's parts on their own (no Ray): the outcome log, the state that survives a restart, and the
one writer of a head's version."""

from __future__ import annotations

import pytest

from fleet.learning.learner_state import STATE_FILE, LearnerState
from fleet.learning.outcomes import OutcomeLog
from fleet.protocol import EpisodeOutcome


def test_outcomes_are_validated_as_episode_outcomes_and_counted():
    log = OutcomeLog(("franka",), keep=8)
    good = EpisodeOutcome("r0", "franka", 3, True, 2, (2,), interventions=1).to_dict()
    records = [
        good,
        good | {"head_version": None, "head_versions": [1, 2]},  # ran two versions: mixed
        good | {"embodiment": "aloha"},  # a head this learner does not adapt
        good | {"success": 1},  # an int is not a bool
        good | {"episode": -1},
        good | {"bogus": 1},  # not an EpisodeOutcome field
        "not a record",
        {k: v for k, v in good.items() if k != "interventions"},  # counted; says nothing about help
    ]
    assert log.record(records) == 2
    assert log.counts == {"received": 8, "counted": 2, "mixed": 1, "other": 1, "malformed": 4}
    assert log.episodes("franka", 2) == [(True, 1), (True, None)] and log.count("franka", 2) == 2
    assert log.record("not a list") == 0 and log.counts["malformed"] == 5
    log.record([good | {"success": False}] * 10)
    assert log.count("franka", 2) == 8 and log.episodes("franka", 2)[-1] == (False, 1)  # the newest `keep`


def test_learner_state_survives_a_restart_and_a_torn_file(tmp_path):
    state = LearnerState(("franka", "aloha"), tmp_path)
    state.cursors["franka"] = 14
    state.rounds, state.published = 2, 1
    state.event("published", "franka", version=2)
    state.save()
    again = LearnerState(("franka", "aloha"), tmp_path)
    assert again.load() is None
    assert again.cursors == {"franka": 14, "aloha": 0} and (again.rounds, again.published) == (2, 1)
    assert [e["event"] for e in again.history] == ["published"]
    (tmp_path / STATE_FILE).write_text("{not json")
    fresh = LearnerState(("franka",), tmp_path)
    assert "unreadable" in fresh.load() and fresh.cursors == {"franka": 0}


def test_a_trained_head_keeps_the_registrys_number_not_the_payloads():
    """A rollback re-publishes v1's bytes as v3: the head installs them as v3."""
    torch = pytest.importorskip("torch")
    from fleet.learning.trained_head import TrainedHead  # torch from here on: the tests above run without it
    from fleet.policy.train import build_model  # torch
    from tests.mocks.tiny_policy import TINY  # torch

    model = build_model(("franka",), seed=0, config=TINY)
    head = TrainedHead(model, "franka")
    v1, v1_payload = head.state(), head.payload()
    head.install(build_model(("franka",), seed=1, config=TINY).head_state_dict("franka"), 2)
    assert head.version == model.head_versions["franka"] == 2 and head.changes == 1
    head.install_payload(v1_payload, 3)
    assert head.version == 3 and head.changes == 2
    assert all(torch.equal(head.state()[k], v) for k, v in v1.items())
    with pytest.raises(ValueError, match="no head 'leap'"):
        TrainedHead(model, "leap")
