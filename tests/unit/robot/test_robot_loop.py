"""RobotLoop with fake policy servers: episodes with a good policy, holding on a dead or hung server within two
control periods, recovery, sim-mode waiting, corrections to the sink, and every degradation transition."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fleet.data.correction import Correction, validate_correction
from fleet.embodiments import EMBODIMENTS
from fleet.protocol import EpisodeOutcome
from fleet.robot import RobotConfig, RobotLoop
from fleet.sim import make_env
from tests.mocks.fake_policy import FEATURE_STATS, FakePolicy

NAMES = ("franka", "aloha", "hello", "leap")


def make(name: str = "franka", mode: str = "expert", sink=None, feature_stats=None, **config) -> RobotLoop:
    env = make_env(name, shift=config.get("shift"))
    client = FakePolicy(env, mode)
    return RobotLoop(RobotConfig(f"r-{name}", name, **config), client, sink, feature_stats, env=env)


def run_episodes(loop: RobotLoop, n: int, max_ticks: int = 5000) -> None:
    for _ in range(max_ticks):
        if loop.stats.episodes_done >= n:
            return
        loop.tick()
    raise AssertionError(f"{n} episodes did not finish in {max_ticks} ticks")


@pytest.mark.parametrize("name", NAMES)
def test_expert_policy_succeeds(name):
    loop = make(name, teleop=False)
    run_episodes(loop, 4)
    r = loop.report()
    assert r["success_rate"] >= 0.75, r
    assert r["fault_holds"] == 0 and r["failed_calls"] == 0 and r["last_error"] is None
    assert r["held_ticks"] == 1  # only the start-up hold
    assert r["state"] == "normal" and r["head_version"] == 1 and r["latency_p50_ms"] is not None


@pytest.mark.parametrize("name", NAMES)
def test_expert_policy_needs_no_correction(name):
    """Requests carry the observation the next tick acts on, so the expert's own chunks are never judged
    stray: a lag of one action between plan and execution made the teleoperator override ~half of them."""
    loop = make(name, seed=1)
    run_episodes(loop, 12)
    r = loop.report()
    assert r["success_rate"] >= 11 / 12, r
    assert r["interventions"] <= 1, r


@pytest.mark.parametrize("name", NAMES)
def test_first_tick_is_the_hold_even_with_a_reply_ready(name):
    loop = make(name)
    loop.client.delay_polls = 0
    target = loop.robot.hold_action()
    result = loop.tick()
    spec = EMBODIMENTS[name]
    assert not result.moved and "startup" in result.fired and loop.first_tick["held"]
    # the hold target is the stop action, or (leap's position targets) where the body is: never a default pose
    if spec.stop_action is not None:
        np.testing.assert_allclose(target, spec.stop_action)
    np.testing.assert_allclose(result.sent, target, atol=1e-6)
    assert loop.tick().moved  # the reply requested on the first tick drives the second


def _run_until_fault(mode: str, name: str = "franka"):
    """Drive with the expert, then switch the server to `mode`; return (loop, due tick, {tick: result})."""
    loop = make(name, realtime=True, teleop=False)  # real-time: the loop never waits for a reply
    for _ in range(6):
        loop.tick()
    loop.client.mode = mode
    obs_tick = loop._newest[0]  # the newest chunk's observation tick
    spec = loop.spec
    requested = obs_tick + spec.recompute_every  # when its successor is requested ...
    due = requested + 1  # ... and due (a server answering within a period delivers it here)
    results = {}
    while loop.tick_in_episode < due + 8:
        t = loop.tick_in_episode
        results[t] = loop.tick()
    assert loop.stats.episodes_done == 0
    return loop, due, results


@pytest.mark.parametrize("mode", ["dead", "hung", "error"])
def test_dead_or_hung_server_holds_within_two_periods_of_the_due_chunk(mode):
    loop, due, results = _run_until_fault(mode)
    stop = np.asarray(loop.spec.stop_action, np.float32)
    for t, res in results.items():
        if t >= due + 1:
            assert not res.moved, f"tick {t}: moved {due=} ({mode})"
        if t >= due + 2:  # held and already at the stop action (the hold ramps within the velocity limit)
            np.testing.assert_array_equal(res.sent, stop, err_msg=f"tick {t}")
    r = loop.report()
    assert r["state"] == "holding" and r["fault_holds"] >= 7
    expected = {"dead": "submit failed", "hung": "overdue", "error": "refused"}[mode]
    assert expected in r["last_error"], r["last_error"]
    assert r["policy_link"] == ("overdue" if mode == "hung" else "down")
    if mode == "hung":
        assert r["overdue_calls"] == 1 and r["abandoned_calls"] == 0  # holding, still waiting for that reply


def test_a_hung_request_is_abandoned_and_asked_again():
    loop, due, _ = _run_until_fault("hung")
    asked = len(loop.client.requests)
    for _ in range(2 * loop.spec.chunk_size):
        assert not loop.tick().moved
    r = loop.report()
    assert r["abandoned_calls"] >= 1 and loop.client.cancelled >= 1 and r["policy_link"] == "overdue"
    assert len(loop.client.requests) == asked + r["abandoned_calls"]  # one request in flight at a time


def test_a_reply_too_late_to_use_is_dropped_and_the_robot_asks_again():
    loop = make("franka", teleop=False, realtime=True)
    loop.client.mode, loop.client.delay_polls = "slow", 8  # answers 8 ticks after each request: always stale
    results = [loop.tick() for _ in range(40)]
    r = loop.report()
    assert r["late_replies"] >= 3 and r["policy_link"] in ("slow", "overdue") and r["state"] == "holding"
    assert not any(res.moved for res in results)  # stale plans never move the robot
    assert len(loop.client.requests) <= 40 // 8 + 1  # no request storm: the next one goes out when one returns


def test_robot_recovers_when_the_server_comes_back():
    loop, _, _ = _run_until_fault("dead")
    loop.client.mode = "expert"
    moved = [loop.tick().moved for _ in range(5)]
    assert all(moved[1:])
    r = loop.report()
    assert r["state"] == "normal" and r["last_error"] is None and r["policy_link"] == "ok"


def test_sim_mode_waits_for_a_slow_server_and_real_time_holds():
    sim = make("hello", teleop=False)
    sim.client.mode, sim.client.delay_polls = "slow", 6
    run_episodes(sim, 2)
    assert sim.report()["fault_holds"] == 0  # simulated time waits for the policy
    rt = make("hello", teleop=False, realtime=True)
    rt.client.mode, rt.client.delay_polls = "slow", 3  # late enough to hold, early enough to use
    for _ in range(40):
        rt.tick()
    r = rt.report()
    assert r["fault_holds"] > 0 and r["failed_calls"] == 0
    assert r["last_error"] is None or "holding" in r["last_error"]


@pytest.mark.parametrize(("delay", "expected"), [(0, {0}), (2, {2}), (None, None)])
def test_sim_mode_uses_each_chunk_from_its_tick_plus_sim_delay_ticks(delay, expected):
    """Sim mode: with sim_delay_ticks d a reply is taken the d-th tick after its observation, whatever the server's
    speed (the fake answers a request only after 7 polls unless the robot waits for it); None keeps running the
    old chunk until the buffer would hold or the reply comes on its own, so the delay depends on the server."""
    loop = make("franka", teleop=False, sim_delay_ticks=delay)
    loop.client.mode, loop.client.delay_polls = "slow", 7
    lags = set()
    for _ in range(60):
        newest, t = loop._newest, loop.tick_in_episode
        loop.tick()
        if loop._newest not in (newest, None) and loop._newest[0] > 0:  # mid-episode chunks (not the first)
            lags.add(t - loop._newest[0])  # the tick that took the reply - the tick its observation is from
    assert lags == expected if expected is not None else lags and min(lags) >= 1
    assert loop.report()["fault_holds"] == 0


def test_corrections_reach_the_sink_and_are_valid():
    got: list[Correction] = []
    loop = make("franka", mode="zeros", sink=got.extend)
    run_episodes(loop, 2)
    r = loop.report()
    assert r["interventions"] > 0 and len(got) == r["interventions"] == r["corrections_sent"]
    assert r["corrections_pending"] == 0
    assert all(isinstance(c, Correction) for c in got) and len({c.id for c in got}) == len(got)
    for c in got[:5]:
        validate_correction(c)
        validate_correction(c.to_dict())  # what the sinks send over Ray
    assert {c.reason for c in got} <= {"stray", "help"}


def test_a_failing_sink_keeps_corrections_for_the_next_try():
    calls: list[int] = []
    delivered: list[dict] = []

    def sink(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise ConnectionError("replay actor unreachable")
        delivered.extend(batch)

    loop = make("franka", mode="zeros", sink=sink)
    run_episodes(loop, 1)
    assert loop.report()["corrections_pending"] == calls[0] > 0
    assert "correction sink failed" in loop.stats.last_error
    run_episodes(loop, 2)
    assert len(delivered) == loop.stats.interventions and loop.report()["corrections_pending"] == 0


def test_low_confidence_pauses_then_the_human_takes_over_and_releases():
    loop = make("hello", mode="noisy")
    for _ in range(4):
        loop.tick()
    loop.client.mode = "expert"
    for _ in range(12):
        loop.tick()
    path = [(t["from"], t["to"]) for t in loop.report()["transitions"]]
    assert path[:3] == [("normal", "paused"), ("paused", "human"), ("human", "normal")]


def test_low_confidence_without_a_human_holds_until_the_episode_ends():
    loop = make("hello", mode="noisy", teleop=False)
    for _ in range(3):
        loop.tick()
    assert loop.degradation.state.value == "paused"
    moved = [loop.tick().moved for _ in range(10)]
    assert not any(moved)  # paused: the safety layer holds, and this is no server fault
    assert loop.report()["state"] == "paused"


def test_novel_scene_slows_the_robot_down():
    loop = make("franka", mode="novel", feature_stats=FEATURE_STATS, teleop=False)
    for _ in range(3):
        loop.tick()
    assert loop.degradation.state.value == "conservative"
    loop.tick()
    assert loop.safety.velocity_scale == 0.5
    loop.client.mode = "expert"  # features back in distribution: three confident checks restore NORMAL
    for _ in range(20):
        loop.tick()
    assert loop.degradation.state.value == "normal" and loop.safety.velocity_scale == 1.0


def test_repeated_failures_escalate_and_only_a_reset_resumes():
    loop = make("leap", mode="zeros", teleop=False, max_consecutive_failures=1)
    run_episodes(loop, 2)
    assert loop.report()["degradation"] == "escalated"
    asked = len(loop.client.requests)
    assert not any(loop.tick().moved for _ in range(10))
    assert len(loop.client.requests) == asked  # an escalated robot stops asking the server
    assert loop.reset_degradation() == "normal"
    loop.client.mode = "expert"
    if loop.safety.estopped:  # the zeros policy slammed the hand shut: a separate operator decision
        assert not any(loop.tick().moved for _ in range(3))
        assert loop.reset_estop()
    assert any(loop.tick().moved for _ in range(3))


def test_malformed_replies_are_counted_and_never_crash_the_loop():
    loop = make("franka", teleop=False, realtime=True)
    loop.tick()
    bad = [{"chunk": np.zeros((16, 3))}, {"no_chunk": 1}, "not a dict", {"chunk": "abc"}]

    def answer(request):
        echo = {k: request[k] for k in ("request_id", "robot_id", "embodiment", "obs_tick")}
        return (
            (bad.pop(0) | echo)
            if bad and isinstance(bad[0], dict)
            else bad.pop(0)
            if bad
            else ({"chunk": loop.env.unwrapped.expert_chunk(), "head_version": 2} | echo)
        )

    loop.client._answer = answer
    for _ in range(30):
        loop.tick()
    r = loop.report()
    assert r["malformed_replies"] == 4 and r["head_version"] == 2 and r["last_error"] is None


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="RobotConfig.embodiment"):
        RobotConfig("r", "spot")
    with pytest.raises(ValueError, match="RobotConfig.robot_id"):
        RobotConfig(" ", "franka")
    with pytest.raises(ValueError, match="RobotConfig.stale_ticks"):
        RobotConfig("r", "franka", stale_ticks=0)
    with pytest.raises(ValueError, match="RobotConfig.sim_wait_s"):
        RobotConfig("r", "franka", sim_wait_s=-1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="RobotConfig.sim_delay_ticks: expected None or a non-negative int"):
            RobotConfig("r", "franka", sim_delay_ticks=bad)
    with pytest.raises(ValueError, match="RobotConfig.seed: expected a non-negative int, got True"):
        RobotConfig("r", "franka", seed=True)  # a bool is never an int
    with pytest.raises(ValueError, match="RobotConfig.n_samples: expected a positive int"):
        RobotConfig("r", "franka", n_samples=0)


def test_the_robot_side_never_imports_torch():
    code = "import sys, fleet.robot, fleet.sim; fleet.sim.make_env('aloha'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_episode_outcomes_carry_the_head_version_they_ran():
    """The learner's success signal: one outcome per finished episode, tagged with the single head version
    whose chunks it ran, None when a head swap happened mid-episode."""
    loop = make("franka", teleop=False)
    run_episodes(loop, 2)
    first = loop.take_outcomes()
    assert [o.episode for o in first] == [0, 1] and loop.take_outcomes() == []
    assert all(o.head_version == 1 and o.head_versions == (1,) and o.embodiment == "franka" for o in first)
    assert [o.success for o in first] == [bool(s) for s in list(loop.stats.outcomes)[:2]]
    assert [EpisodeOutcome.from_dict(o.to_dict()) for o in first] == first  # what crosses Ray to the learner
    assert first[0].to_dict()["head_versions"] == [1]
    loop.tick(), loop.tick()  # episode 2 starts on version 1 ...
    assert loop.stats.episodes_done == 2
    loop.client.head_version = 2  # ... and a new head is published mid-episode
    run_episodes(loop, 4)
    swapped, clean = loop.take_outcomes()
    assert swapped.head_version is None and swapped.head_versions == (1, 2)
    assert clean.head_version == 2


def test_a_force_estop_stays_latched_until_an_operator_resets_it():
    """A trip latches: the robot holds on every later tick, also once the force is gone, until reset_estop()."""
    loop = make("franka", teleop=False)
    for _ in range(5):
        loop.tick()
    loop._last_force = EMBODIMENTS["franka"].max_force * 2  # the arm presses too hard
    tripped = loop.tick()
    assert not tripped.moved and "force_estop" in tripped.fired and loop.state == "estop"
    for _ in range(30):  # the force is gone (the sim reads ~0 while the arm holds): still stopped
        r = loop.tick()
        assert not r.moved and loop.report()["estop_latched"] is True
    report = loop.report()
    assert report["state"] == "estop" and report["safety"]["estop_trips"] == 1 and report["estop_resets"] == 0
    assert loop.reset_estop() is True and loop.reset_estop() is False  # the operator's decision, counted once
    assert any(loop.tick().moved for _ in range(20))
    report = loop.report()
    assert report["estop_latched"] is False and report["estop_resets"] == 1 and report["state"] != "estop"


@pytest.mark.parametrize("name", ["aloha", "franka"])
def test_rtc_mode_sends_the_committed_plan_with_each_request(name):
    """aggregate="rtc": once a chunk is buffered, each request carries the plan the robot executes next (prefix,
    prefix_delay), valid as the server checks it; the default mode sends none."""
    from fleet.protocol import validate_request

    spec = EMBODIMENTS[name]
    loop = make(name, teleop=False, aggregate="rtc")
    run_episodes(loop, 2)
    requests = loop.policy.client.requests
    sent = [r for r in requests if "prefix" in r]
    assert len(sent) >= len(requests) // 2, (len(sent), len(requests))
    for r in sent:
        assert r["prefix"].shape[1] == spec.action_dim and 0 <= r["prefix_delay"] <= len(r["prefix"])
        validate_request(r)
    plain = make(name, teleop=False)
    run_episodes(plain, 1)
    assert not any("prefix" in r for r in plain.policy.client.requests)


def test_the_loop_gives_the_safety_layer_the_proprio_its_walls_need():
    """A policy that only ever commands franka downwards: the loop's safety layer, given the arm's proprio, keeps
    the command at most 1 cm into the table, so the contact force stays at 8 N and the e-stop (30 N) never trips.
    Without the proprio the first push at the table reads 32 N or more and latches it."""

    class Descend(FakePolicy):
        def _answer(self, request: dict) -> dict:
            reply = super()._answer(request)
            reply["chunk"] = reply["chunk"].copy()
            reply["chunk"][:, 2] = -0.05
            return reply

    env = make_env("franka")
    loop = RobotLoop(RobotConfig("r-franka", "franka", teleop=False), Descend(env), None, None, env=env)
    peak = 0.0
    for _ in range(60):
        loop.tick()
        peak = max(peak, loop._last_force)
    report = loop.report()
    assert 0 < peak <= 8.0 + 1e-4 and report["state"] != "estop" and report["safety"]["estop_trips"] == 0
    assert report["safety"]["workspace"] > 0


def test_arrival_alignment_runs_a_late_reply_from_its_first_action():
    """align="arrival" (the default): a reply taken 2 ticks after its observation starts with its action 0 (none
    dropped); "time" skips the 2 actions meant for ticks that passed. Either way the expert's chunks finish the task."""
    for align in (None, "time", "arrival"):
        loop = make("franka", teleop=False, sim_delay_ticks=2, align=align)
        loop.client.mode, loop.client.delay_polls = "slow", 7  # answers only when the robot waits: at tick + 2
        run_episodes(loop, 3)
        dropped = loop.buffer.stats()["dropped_stale"]
        assert loop.buffer.config.align == (align or "arrival")
        assert dropped > 0 if align == "time" else dropped == 0
        r = loop.report()
        assert r["fault_holds"] == 0 and r["success_rate"] > 0.5, r
        assert r["reply_delay_ticks"] == 2 and r["align"] == (align or "arrival")
    on_time = make("franka", teleop=False)  # a fast server: replies are taken on the tick they were asked for
    run_episodes(on_time, 3)
    assert on_time.buffer.reply_delays[-4:] == (0, 0, 0, 0)  # (the robot's very first chunk lands during start-up)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"align": "late"}, "RobotConfig.align"),
        ({"aggregate": "blend"}, "RobotConfig.aggregate"),
        ({"aggregate": "rtc", "align": "arrival"}, "RobotConfig.align: expected 'time' with aggregate='rtc'"),
    ],
)
def test_bad_buffer_settings_are_refused_naming_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        RobotConfig("r", "franka", **config)
    assert RobotConfig("r", "franka", aggregate="rtc").buffer_align == "time"  # rtc's own default


def test_rtc_commits_what_the_safety_layer_will_send_not_the_raw_plan():
    """rtc, replies 2 ticks late: each request's committed prefix is exactly what the robot then sends on the 2
    ticks before its reply arrives, even where the rate limits bend the plan (franka's gripper steps do)."""
    loop = make("franka", teleop=False, aggregate="rtc", sim_delay_ticks=2)
    loop.client.mode, loop.client.delay_polls = "slow", 7  # answers only when the robot waits: at tick + 2
    sent_at, bent = {}, 0
    for _ in range(300):
        key = (loop.episode, loop.tick_in_episode)
        result = loop.tick()
        sent_at[key] = result.sent
        bent += int("velocity" in result.fired)
    committed = 0
    for request in loop.policy.client.requests:
        d = int(request.get("prefix_delay", 0))
        episode, tick = (int(x) for x in request["request_id"].split(":")[1:3])
        for i in range(d):
            if (episode, tick + i) in sent_at:
                np.testing.assert_allclose(request["prefix"][i], sent_at[(episode, tick + i)], atol=1e-6)
                committed += 1
    assert committed >= 20 and bent >= 1, (committed, bent)
