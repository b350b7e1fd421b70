"""Onboarding without Ray: the spec file, the demonstration link, episodes from the replay store's records, the
session's rounds, check and publish. Demonstrations come from a robot loop in demonstration mode, as in the
fleet."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fleet.data.correction import random_correction
from fleet.embodiments import CATALOG, EMBODIMENTS, register_embodiment
from fleet.learning.onboard_live import OnboardSession, episodes_from_corrections
from fleet.learning.onboard_spec import OnboardSpec, load_spec_file
from fleet.policy.checkpoint import head_from_bytes
from fleet.policy.extend import add_body_from_payload
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import default_vocabulary
from fleet.robot import RobotConfig, RobotLoop
from fleet.robot.demonstration import DemonstrationLink
from fleet.sim import make_env
from tests.mocks.tiny_policy import TINY

torch.set_num_threads(1)
SO100 = CATALOG["so100"]


def plan(**kw) -> OnboardSpec:
    raw = SO100.to_dict() | {"demos_per_round": 2, "steps_per_round": 5, "check_episodes": 2}
    raw |= {"first_round_demos": 2, "first_round_steps": 5} | kw
    return OnboardSpec.from_dict(raw)


@pytest.fixture(autouse=True)
def so100_registered():
    """so100 in the registry while a test runs (a fleet's processes register it on `fleet embodiment add`)."""
    added = "so100" not in EMBODIMENTS
    if added:
        register_embodiment(SO100)
    yield
    if added:
        EMBODIMENTS.pop("so100", None)


def demo_episode(seed: int = 0, episode: int = 0):
    """One demonstration episode of a so100 robot loop in demonstration mode, as the onboarding actor reads it
    from the replay store."""
    stored: list = []
    config = RobotConfig(f"robot-so100-{seed}", "so100", seed=100 * seed + episode, demonstrate=True)
    loop = RobotLoop(config, None, stored.extend)
    while loop.stats.episodes_done < 1:
        loop.tick()
    ((_, demo),) = episodes_from_corrections("so100", stored)
    return demo


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
    link = DemonstrationLink(lambda: env.unwrapped.expert_chunk(), SO100)
    link.submit({"embodiment": "so100", "robot_id": "r", "request_id": "a", "obs_tick": 0})
    reply = link.poll()
    assert reply["demonstration"] is True and reply["head_version"] == 0 and reply["robot_id"] == "r"
    np.testing.assert_array_equal(reply["chunk"], env.unwrapped.expert_chunk())
    assert link.poll() is None
    with pytest.raises(ValueError, match="franka"):
        link.submit({"embodiment": "franka"})
    nobody = DemonstrationLink(lambda: None, SO100)  # a robot whose task cannot demonstrate says so
    with pytest.raises(RuntimeError, match="demonstrate"):
        nobody.submit({"embodiment": "so100"})


def test_records_become_one_episode_per_robot_and_episode():
    """The replay store's records (demonstrations and corrections of policy chunks alike) grouped by robot and
    episode, in arrival order; each sample is what the operator commanded."""
    rng = np.random.default_rng(0)
    recs = [
        random_correction("so100", rng, robot_id="robot-so100-0", episode=3, policy_chunk=None, reason="demo"),
        random_correction("so100", rng, robot_id="robot-so100-1", episode=3),
        random_correction("so100", rng, robot_id="robot-so100-0", episode=3, policy_chunk=None, reason="demo"),
        random_correction("franka", rng),  # another body's: not this body's episode
        random_correction("so100", rng, robot_id="robot-so100-0", episode=4),
    ]
    got = episodes_from_corrections("so100", recs)
    assert [k for k, _ in got] == [("robot-so100-0", 3), ("robot-so100-1", 3), ("robot-so100-0", 4)]
    first = got[0][1]
    assert len(first) == 2 and first.episodes == 1 and first.actions.shape == (2, 16, 6)
    np.testing.assert_array_equal(first.actions[1], recs[2].corrected_chunk)
    np.testing.assert_array_equal(first.images[0], recs[0].image)
    assert first.instructions == [recs[0].instruction, recs[2].instruction]
    assert episodes_from_corrections("so100", []) == []


def test_an_episode_read_in_two_parts_counts_once():
    session = OnboardSession(plan(first_round_demos=2), tiny_with_so100(), lambda p, m: 1)
    demo = demo_episode(0)
    session.add_episode(demo)
    session.add_episode(demo, new=False)  # more records of the same episode
    assert session.total_demos == 1 and not session.due() and len(session.episodes) == 2
    session.add_episode(demo_episode(1))
    assert session.total_demos == 2 and session.due()


def test_session_trains_checks_and_publishes_only_what_passes():
    model = tiny_with_so100()
    franka_before = {k: v.clone() for k, v in model.head("franka").state_dict().items()}
    published: list[tuple[bytes, dict]] = []

    def publish(payload: bytes, meta: dict) -> int:
        published.append((payload, meta))
        return len(published)

    strict = OnboardSession(plan(check_success=1.0), model, publish)
    for i in range(2):
        demo = demo_episode(0, episode=i)
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


def _session_at_v2(**kw):
    """A session that published v1 and then v2 (held-out check off), and what it published."""
    model = tiny_with_so100()
    published: list[tuple[bytes, dict]] = []

    def publish(payload: bytes, meta: dict) -> int:
        published.append((payload, meta))
        return len(published)

    session = OnboardSession(plan(check_success=0.0, watch_episodes=5, reference_episodes=10, **kw), model, publish)
    for version in (1, 2):
        for i in range(2):
            session.add_episode(demo_episode(0, episode=2 * version + i))
        assert session.train_round()["published"] == version
        if version == 1:
            assert session.watch is None  # v1 has nothing to roll back to
            for _ in range(10):
                assert session.record_policy_episode(1, True, 0) is None
    return session, model, published


def test_a_worse_new_version_is_rolled_back_to_the_previous_one():
    session, model, published = _session_at_v2()
    v1_payload = published[0][0]
    assert session.watch == session.status()["watch"] | {"episodes": 0} or session.watch["version"] == 2
    for _ in range(2):
        session.add_episode(session.episodes[0])
    assert not session.due()  # no round while a rollout is watched
    for _ in range(4):
        assert session.record_policy_episode(2, False, 3) is None
    assert session.record_policy_episode(1, True, 0) is None  # an episode of another version does not count
    event = session.record_policy_episode(2, False, 3)
    # v2 failed 5 of 5 where v1 succeeded 11 of 11: v1's payload goes out again, as v3 (a number is never reused)
    assert event["event"] == "rollback" and event["restores"] == 1 and event["version"] == 3
    assert len(published) == 3 and published[2][0] == v1_payload and published[2][1]["rollback_of"] == 2
    assert session.version == 3 and model.head_versions["so100"] == 3 and session.watch is None
    # training continues from v1's parameters
    ref = FleetPolicy(TINY, {"franka": EMBODIMENTS["franka"]}, default_vocabulary(["franka"]))
    add_body_from_payload(ref, v1_payload)
    for key, value in ref.head("so100").state_dict().items():
        assert torch.equal(model.head("so100").state_dict()[key], value), key
    assert session.status()["rollouts"][-1]["event"] == "rollback" and session.due()


def test_a_new_version_that_holds_is_confirmed_and_nothing_is_published():
    session, _, published = _session_at_v2()
    events = [session.record_policy_episode(2, ok, 0) for ok in (True, True, True, False, True)]
    assert events[:4] == [None] * 4 and events[4]["event"] == "rollout_confirmed"
    assert len(published) == 2 and session.version == 2 and session.watch is None
    with pytest.raises(ValueError, match="watch_episodes"):
        plan(watch_episodes=0)


def test_the_first_round_waits_for_its_demonstrations_and_runs_its_own_schedule():
    """The first round trains one longer schedule on `first_round_demos` demonstrations; later rounds come every
    `demos_per_round` and run `steps_per_round` steps."""
    model = tiny_with_so100()
    session = OnboardSession(
        plan(first_round_demos=3, first_round_steps=7, demos_per_round=1, steps_per_round=2), model, lambda p, m: 1
    )
    for i in range(3):
        assert not session.due(), f"due after {i} of 3 demonstrations"
        session.add_episode(demo_episode(0, episode=i))
    assert session.due()
    # the round in progress is in the status (`fleet embodiment status` shows it), and gone once it is over
    seen = []
    check = session.check
    session.check = lambda: (seen.append(session.status()["training"]), check())[1]
    assert session.status()["training"] is None
    assert session.train_round()["steps"] == 7
    assert seen[0]["round"] == 1 and seen[0]["stage"] == "checking" and seen[0]["done"] == seen[0]["steps"] == 7
    assert seen[0]["elapsed_s"] >= 0 and session.status()["training"] is None
    assert not session.due()
    session.add_episode(demo_episode(0, episode=3))
    assert session.due() and session.train_round()["steps"] == 2


def record_during_round(session: OnboardSession, late: list) -> None:
    """The robots keep recording while the session's next round trains: `late` arrives at its step 50 (the
    round's progress callback, every 50 steps)."""
    trained = session._trained

    def record_meanwhile(steps: int, loss: float) -> None:
        trained(steps, loss)
        if steps == 50:
            for episode in late:
                session.add_episode(episode)

    session._trained = record_meanwhile


def test_episodes_that_arrive_while_a_round_trains_join_its_data():
    """The robots keep recording while the first round trains: each episode that arrives joins the round's data
    at its next refresh (the proprio statistics refit on all of it), and does not make the next round due."""
    model = tiny_with_so100()
    session = OnboardSession(
        plan(first_round_demos=2, first_round_steps=100, demos_per_round=2, steps_per_round=2), model, lambda p, m: 1
    )
    for i in range(2):
        session.add_episode(demo_episode(0, episode=i))
    record_during_round(session, [demo_episode(1, episode=i) for i in range(2)])
    entry = session.train_round()
    everything = [*session.episodes]
    assert entry["demos"] == 4 and entry["samples"] == sum(len(e) for e in everything)
    proprio = np.concatenate([e.proprio[:, : SO100.proprio_dim] for e in everything]).astype(np.float32)
    np.testing.assert_allclose(model.head("so100").stem.mean.numpy(), proprio.mean(0), rtol=1e-4, atol=1e-5)
    assert session.new_since_round == 0 and not session.due()  # the round learnt from them already
    session.add_episode(demo_episode(2))
    session.add_episode(demo_episode(3))
    assert session.due()


def test_a_round_takes_in_at_most_max_demos_episodes():
    """A fleet run flat out records faster than a round trains: the round's data stops at max_demos episodes
    (its memory stays bounded), and the episodes it left count toward the next round."""
    session = OnboardSession(
        plan(first_round_demos=2, first_round_steps=100, demos_per_round=2, steps_per_round=2, max_demos=3),
        tiny_with_so100(),
        lambda p, m: 1,
    )
    first = [demo_episode(0, episode=i) for i in range(2)]
    for episode in first:
        session.add_episode(episode)
    late = [demo_episode(1, episode=i) for i in range(3)]
    record_during_round(session, late)
    entry = session.train_round()
    assert entry["demos"] == 3 and entry["samples"] == sum(len(e) for e in [*first, late[0]])
    assert session.new_since_round == 2 and session.due()  # the two it had no room for


def test_plan_fields_of_the_first_round_and_training_threads_are_checked():
    p = OnboardSpec(spec=SO100, sim="so100")
    assert (p.first_round_demos, p.first_round_steps, p.train_threads) == (20, 1000, 1)
    assert OnboardSpec.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="first_round_demos"):
        plan(first_round_demos=0)
    with pytest.raises(ValueError, match="first_round_demos.*max_demos"):
        plan(first_round_demos=500, max_demos=400)
    with pytest.raises(ValueError, match="first_round_steps"):
        plan(first_round_steps=1.5)
    with pytest.raises(ValueError, match="train_threads"):
        plan(train_threads=0)


def test_demo_noise_is_checked():
    """(What the noise does to a robot's path: tests/unit/robot/test_demonstration_mode.py.)"""
    assert OnboardSpec(spec=SO100, sim="so100").demo_noise == 0.2
    for bad in (-0.1, 1.5, "0.2", float("nan")):
        with pytest.raises(ValueError, match="demo_noise"):
            plan(demo_noise=bad)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread SCHED_IDLE is Linux's")
def test_lower_priority_renices_every_thread_of_the_process():
    """In a child process (niceness cannot be raised back): a thread started before and one started after the
    call both end at the lower priority and under SCHED_IDLE."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, threading
        from fleet.policy.openmp import lower_priority
        seen, go = {}, threading.Event()
        def where():
            return os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0) == os.SCHED_IDLE
        def early():
            go.wait()
            seen["early"] = where()
        t = threading.Thread(target=early)
        t.start()
        print(lower_priority(os.getpriority(os.PRIO_PROCESS, 0) + 3, idle=True) - os.getpriority(os.PRIO_PROCESS, 0))
        go.set()
        t.join()
        late = threading.Thread(target=lambda: seen.setdefault("late", where()))
        late.start()
        late.join()
        print(*seen["early"], *seen["late"], *where())
        """
    )
    before = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    want = min(19, before + 3)
    assert out == ["0", str(want), "True", str(want), "True", str(want), "True"]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this process untouched
