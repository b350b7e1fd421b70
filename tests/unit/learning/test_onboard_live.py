"""Onboarding without Ray: the spec file, the demonstration link, the session's rounds, check and publish."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fleet.embodiments import CATALOG, EMBODIMENTS
from fleet.learning.onboard_live import OnboardRobot, OnboardSession
from fleet.learning.onboard_spec import OnboardSpec, load_spec_file
from fleet.policy.checkpoint import head_from_bytes
from fleet.policy.extend import add_body_from_payload
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import default_vocabulary
from fleet.robot.demonstration import DemonstrationLink
from fleet.sim import make_env
from tests.mocks.tiny_policy import TINY

torch.set_num_threads(1)
SO100 = CATALOG["so100"]


def plan(**kw) -> OnboardSpec:
    raw = SO100.to_dict() | {"demos_per_round": 2, "steps_per_round": 5, "check_episodes": 2} | kw
    return OnboardSpec.from_dict(raw)


def tiny_with_so100() -> FleetPolicy:
    torch.manual_seed(0)
    model = FleetPolicy(TINY, {"franka": EMBODIMENTS["franka"]}, default_vocabulary(["franka"])).eval()
    model.add_embodiment(SO100, like="franka")
    return model


def test_spec_file_round_trip_and_errors(tmp_path):
    p = plan(like="franka", robots=3)
    assert p.spec == SO100 and p.sim == "so100" and p.robots == 3
    f = tmp_path / "so100.json"
    f.write_text(json.dumps(p.to_dict()))
    assert load_spec_file(f) == p
    with pytest.raises(ValueError, match="unknown"):
        OnboardSpec.from_dict(SO100.to_dict() | {"wheels": 4})
    with pytest.raises(ValueError, match="missing"):
        OnboardSpec.from_dict({"name": "x"})
    with pytest.raises(ValueError, match="robots"):
        plan(robots=-1)
    with pytest.raises(ValueError, match="check_success"):
        plan(check_success=1.5)
    with pytest.raises(ValueError, match="action_low"):
        OnboardSpec.from_dict(SO100.to_dict() | {"action_low": [0.0]})
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_spec_file(f)


def test_demonstration_link_answers_with_the_operator_chunk():
    env = make_env("so100", seed=1)
    env.reset()
    link = DemonstrationLink(env)
    link.submit({"embodiment": "so100", "request_id": "a", "obs_tick": 0})
    reply = link.poll()
    assert reply["demonstration"] is True and reply["head_version"] == 0
    np.testing.assert_array_equal(reply["chunk"], env.unwrapped.expert_chunk())
    assert link.poll() is None
    with pytest.raises(ValueError, match="franka"):
        link.submit({"embodiment": "franka"})


def test_session_trains_checks_and_publishes_only_what_passes():
    model = tiny_with_so100()
    franka_before = {k: v.clone() for k, v in model.head("franka").state_dict().items()}
    published: list[tuple[bytes, dict]] = []

    def publish(payload: bytes, meta: dict) -> int:
        published.append((payload, meta))
        return len(published)

    strict = OnboardSession(plan(check_success=1.0), model, publish)
    robot = OnboardRobot("robot-so100-0", SO100, "so100", seed=0)
    for _ in range(2):
        demo, ok = robot.demonstration_episode()
        assert len(demo) > 5 and demo.actions.shape[1:] == (16, 6)
        strict.add_episode(demo)
    assert strict.due()
    entry = strict.train_round()
    # a 5-step model cannot succeed on every held-out scene: nothing is published, the robots keep demonstrating
    assert entry["published"] is None and strict.phase == "demonstrations" and not published
    assert not strict.due()

    lenient = OnboardSession(plan(check_success=0.0), model, publish)
    for e in strict.episodes:
        lenient.add_episode(e)
    entry = lenient.train_round()
    assert entry["published"] == 1 and lenient.phase == "policy" and lenient.status()["head_version"] == 1
    payload, meta = published[0]
    assert meta["demos"] == 2
    # the payload alone gives another model the whole body; the other head never changed
    other = FleetPolicy(TINY, {"franka": EMBODIMENTS["franka"]}, default_vocabulary(["franka"]))
    spec, version = add_body_from_payload(other, payload)
    assert spec == SO100 and version == 1
    for key, value in franka_before.items():
        assert torch.equal(model.head("franka").state_dict()[key], value), key
    head_from_bytes(other, "so100", payload)  # an ordinary swap afterwards


def test_policy_episode_with_operator_review():
    robot = OnboardRobot("robot-so100-1", SO100, "so100", seed=1)
    zeros = np.zeros((16, 6), np.float32)
    corrected, ok = robot.policy_episode(lambda request: {"chunk": zeros, "head_version": 1})
    # a policy that never moves strays from the operator's plan: each reviewed chunk was corrected and kept
    assert robot.corrections >= 1 and len(corrected) == robot.corrections
    assert robot.report()["policy_episodes"] == 1
