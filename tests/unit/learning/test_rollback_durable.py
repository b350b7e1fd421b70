"""Rollout decisions that survive faults (no Ray): a rollback is recorded before it acts and retried until done,
across registry errors, a lost answer and a learner restart; a head some replica refused is rolled back; a
rollout is confirmed on a timeout only once every live replica installed it; a reader holding the state's lock
never sees a verdict that is not saved yet."""

from __future__ import annotations

import threading
import time

import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.learning.head_store import HeadStore
from fleet.learning.learner import LearnerConfig
from fleet.learning.learner_state import LearnerState
from fleet.learning.outcomes import OutcomeLog
from fleet.learning.rollout import RolloutWatch
from fleet.learning.trained_head import TrainedHead
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.train import build_model
from tests.mocks.tiny_policy import TINY

NAMES = tuple(EMBODIMENTS)[:4]
CONFIG = LearnerConfig(watch_episodes=5, min_reference=5)
OK = {"robot_id": "r0", "embodiment": "franka", "episode": 0, "success": True}


class FlakyRegistry:
    """A HeadStore whose publish fails `fail` times: before storing ("error") or after ("lost answer")."""

    def __init__(self, store: HeadStore, fail: int = 0, when: str = "error") -> None:
        self.store, self.fail, self.when, self.calls = store, fail, when, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def publish(self, *args):
        self.calls += 1
        if self.fail and self.when == "error":
            self.fail -= 1
            raise ConnectionError("registry unavailable")
        version = self.store.publish(*args)
        if self.fail:
            self.fail -= 1
            raise TimeoutError("the answer was lost")
        return version


@pytest.fixture
def fleet(tmp_path):
    """A registry holding franka v1 and v2 (v2 just published, serving in the learner's head)."""
    store = HeadStore(tmp_path / "heads")
    v1 = head_to_bytes(build_model(NAMES, 0, TINY), "franka", 1)
    v2 = head_to_bytes(build_model(NAMES, 1, TINY), "franka", 2)
    store.publish("franka", 1, v1)
    store.publish("franka", 2, v2)
    return store, v1, v2, tmp_path / "state"


def learner_parts(registry, state_dir, version: int = 2):
    """What a (re)started learner builds: its state loaded from disk, its head at `version` of the registry."""
    state = LearnerState(("franka",), state_dir)
    assert state.load() is None
    heads = {"franka": TrainedHead(build_model(NAMES, 2, TINY), "franka")}
    heads["franka"].install_payload(registry.get("franka", version)[1], version)
    outcomes = OutcomeLog(("franka",), keep=100)
    return RolloutWatch(CONFIG, outcomes, registry, heads, state, log=lambda _m: None), heads


def worse_outcomes(watch: RolloutWatch) -> None:
    watch.outcomes.record([OK | {"head_version": 1}] * 10 + [OK | {"head_version": 2, "success": False}] * 5)


def test_a_failed_rollback_is_retried_across_a_registry_error_and_a_learner_restart(fleet) -> None:
    store, v1, _, state_dir = fleet
    flaky = FlakyRegistry(store, fail=3)
    watch, _ = learner_parts(flaky, state_dir)
    watch.start("franka", 2, 1)
    worse_outcomes(watch)
    assert watch.judge("franka") is None  # decided, but the registry failed: nothing done yet
    assert "franka" in watch and "will retry" in watch.last_error
    assert watch.judge("franka") is None  # still failing
    assert store.latest() == {"franka": 2}

    # the learner dies here; a new one loads the pending decision from disk and finishes it
    again, heads = learner_parts(flaky, state_dir)
    assert again.status()["franka"]["rollback_pending"] is True and "franka" in again
    assert again.judge("franka") is None  # the third failure
    event = again.judge("franka")
    assert event["event"] == "rollback" and event["rolled_back"] == 2 and event["restores"] == 1
    assert event["attempts"] == 4 and event["version"] == 3
    assert store.latest() == {"franka": 3} and store.get("franka", 3)[1] == v1 and heads["franka"].version == 3
    assert "franka" not in again and again.state.rollbacks == 1
    assert learner_parts(store, state_dir, 3)[0].pending == {}  # done is durable too


def test_a_rollback_whose_answer_was_lost_is_published_once(fleet) -> None:
    store, v1, _, state_dir = fleet
    flaky = FlakyRegistry(store, fail=1, when="lost answer")
    watch, _ = learner_parts(flaky, state_dir)
    watch.start("franka", 2, 1)
    worse_outcomes(watch)
    assert watch.judge("franka") is None  # stored, but the learner never heard
    event = watch.judge("franka")  # the retry publishes the same number: answered, not stored again
    assert event["version"] == 3 and store.latest() == {"franka": 3} and flaky.calls == 2
    assert [h["version"] for h in store.history("franka")] == [1, 2, 3]


def test_a_head_a_replica_refused_is_rolled_back(fleet) -> None:
    store, v1, _, state_dir = fleet
    watch, _ = learner_parts(store, state_dir)
    watch.start("franka", 2, 1)
    store.report_serving("replica-a", {"franka": 2})
    store.report_serving("replica-b", {"franka": 1}, None, [{"embodiment": "franka", "version": 2, "error": "NaN"}])
    event = watch.judge("franka")  # no episodes needed: part of the fleet cannot serve it
    assert event["event"] == "rollback" and "replica-b: NaN" in event["reason"]
    assert store.get("franka")[1] == v1


def test_a_rollout_is_confirmed_on_timeout_only_once_every_replica_installed_it(fleet) -> None:
    store, _, _, state_dir = fleet
    state = LearnerState(("franka",), state_dir)
    heads = {"franka": TrainedHead(build_model(NAMES, 2, TINY), "franka")}
    cfg = LearnerConfig(watch_episodes=5, min_reference=5, watch_timeout_s=0.05)
    watch = RolloutWatch(cfg, OutcomeLog(("franka",), keep=100), store, heads, state, log=lambda _m: None)
    watch.start("franka", 2, 1)
    store.report_serving("replica-a", {"franka": 2})
    store.report_serving("replica-b", {"franka": 1})  # has not installed it yet
    time.sleep(0.1)
    assert watch.judge("franka") is None  # before: confirmed on the timeout although replica-b never had it
    store.report_serving("replica-b", {"franka": 2})
    assert watch.judge("franka") is None  # installed everywhere now: the timeout starts here
    time.sleep(0.1)
    event = watch.judge("franka")
    assert event["event"] == "rollout_confirmed" and event["why"] == "timeout"


def test_a_verdict_is_saved_before_a_reader_holding_the_lock_can_see_it(fleet) -> None:
    """The learner's status holds `state.lock`: a test (or operator) that saw the watch end and killed the
    learner used to find the watch back after the restart, because the verdict was shown before it was saved."""
    store, _, _, state_dir = fleet
    watch, _ = learner_parts(store, state_dir)
    watch.start("franka", 2, 1)
    could_read, save = [], watch.state.save

    def save_while_another_thread_tries_to_read() -> None:
        def reader() -> None:
            got = watch.state.lock.acquire(blocking=False)
            could_read.append(got)
            if got:
                watch.state.lock.release()

        thread = threading.Thread(target=reader)
        thread.start()
        thread.join()
        save()

    watch.state.save = save_while_another_thread_tries_to_read
    watch.outcomes.record([OK | {"head_version": 1}] * 5 + [OK | {"head_version": 2}] * 5)
    assert watch.judge("franka")["event"] == "rollout_confirmed"
    assert could_read == [False]  # the change and its save were one step for the reader
    restarted = LearnerState(("franka",), state_dir)
    assert restarted.load() is None and restarted.watching == {}
