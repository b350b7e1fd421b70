"""ReplayActor on a real local Ray: acknowledged corrections survive kills, retries dedup, bad input is counted."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from fleet.data.correction import random_correction, validate_correction
from fleet.data.log import CorrectionLog

pytestmark = pytest.mark.ray

NAMES = ("franka", "aloha", "hello", "leap")


def dicts(n: int, embodiment: str, seed: int) -> list[dict]:
    """What a numpy-only robot actor sends: plain dicts of builtins and arrays."""
    rng = np.random.default_rng(seed)
    return [random_correction(embodiment, rng).to_dict() for _ in range(n)]


@pytest.fixture
def replay(ray_session, tmp_path):
    """Yields (start, log_dir, name): `start()` gets the uniquely named replay actor on a fresh log."""
    from actors.replay import start_replay_actor

    handles = []
    name = f"replay-{uuid.uuid4().hex[:8]}"

    def start(**kwargs):
        handle = start_replay_actor(tmp_path / "log", capacity=50, name=name, **kwargs)
        handles.append(handle)
        return handle

    yield start, tmp_path / "log", name
    for handle in handles:
        ray_session.kill(handle, no_restart=True)


def stored_ids(ray, handle) -> list[str]:
    out = []
    for name in NAMES:
        out += [c.id for c in ray.get(handle.since.remote(name, 0))["corrections"]]
    return out


def kill_and_wait(ray, handle, old_pid: int | None = None) -> None:
    """Kill the actor's process and wait until a new incarnation (another pid) answers."""
    if old_pid is None:
        old_pid = ray.get(handle.stats.remote())["pid"]
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            if ray.get(handle.stats.remote(), timeout=30)["pid"] != old_pid:
                return
        except ray.exceptions.RayActorError:
            pass  # dead, not yet restarted
        assert time.monotonic() < deadline, "the replay actor did not restart"
        time.sleep(0.1)


def test_kill_between_batches_keeps_every_acknowledged_correction(ray_session, replay):
    ray = ray_session
    start, log_dir, _ = replay
    handle = start()
    acked = []
    for i, name in enumerate(NAMES):
        acked += ray.get(handle.add.remote(dicts(3, name, seed=i)))["accepted"]
    kill_and_wait(ray, handle)
    stats = ray.get(handle.stats.remote())
    assert stats["loaded_at_start"] == len(acked) == 12
    ids = stored_ids(ray, handle)
    assert sorted(ids) == sorted(acked) and len(set(ids)) == len(ids)
    more = ray.get(handle.add.remote(dicts(2, "franka", seed=99)))  # keeps accepting after the restart
    assert len(more["accepted"]) == 2
    assert ray.get(handle.counts.remote())["franka"] == {"count": 5, "total_added": 5}


def test_kill_while_an_add_is_in_flight(ray_session, replay):
    ray = ray_session
    start, log_dir, _ = replay
    handle = start(publish_delay_s=0.8)  # widens the window between temp-file fsync and rename
    acked = ray.get(handle.add.remote(dicts(2, "hello", seed=1)))["accepted"]
    pid = ray.get(handle.stats.remote())["pid"]
    in_flight = handle.add.remote(dicts(3, "aloha", seed=2))
    queued = handle.add.remote(dicts(2, "leap", seed=3))
    deadline = time.monotonic() + 30
    while not CorrectionLog(log_dir).temp_files():  # the write is under way, not yet published
        assert time.monotonic() < deadline, "the in-flight add never started writing"
        time.sleep(0.01)
    kill_and_wait(ray, handle, pid)
    # Ray retries both calls on the restarted actor; each answers only once its batch is durable
    for ref in (in_flight, queued):
        reply = ray.get(ref, timeout=60)
        assert not reply["rejected"]
        acked += reply["accepted"] + reply["duplicates"]
    stats = ray.get(handle.stats.remote())
    assert stats["temp_files_removed_at_start"] >= 1  # the killed write's unpublished temp file
    ids = stored_ids(ray, handle)
    assert sorted(ids) == sorted(acked) and len(ids) == 7
    assert sorted(c.id for c in CorrectionLog(log_dir).read_all()) == sorted(acked)
    assert ray.get(handle.add.remote(dicts(1, "franka", seed=4)))["accepted"]


def test_retries_with_the_same_id_are_deduplicated_across_restarts(ray_session, replay):
    ray = ray_session
    start, log_dir, _ = replay
    handle = start()
    sent = dicts(4, "franka", seed=5)
    first = ray.get(handle.add.remote(sent))
    assert len(first["accepted"]) == 4
    again = ray.get(handle.add.remote(sent + sent[:1]))
    assert again["accepted"] == [] and again["duplicates"] == [d["id"] for d in sent + sent[:1]]
    kill_and_wait(ray, handle)
    after = ray.get(handle.add.remote(sent))
    assert after["accepted"] == [] and len(after["duplicates"]) == 4
    assert ray.get(handle.counts.remote())["franka"]["total_added"] == 4
    assert len(CorrectionLog(log_dir).read_all()) == 4


def test_malformed_corrections_are_rejected_counted_and_the_actor_keeps_working(ray_session, replay):
    ray = ray_session
    start, _, _ = replay
    handle = start()
    good = dicts(2, "leap", seed=6)
    wrong_dims = {**dicts(1, "leap", seed=7)[0], "corrected_chunk": np.zeros((16, 7), np.float32)}
    nan_state = {**dicts(1, "hello", seed=8)[0], "proprio": np.full(5, np.nan, np.float32)}
    unknown = {**dicts(1, "franka", seed=9)[0], "embodiment": "spot"}
    reply = ray.get(handle.add.remote([good[0], wrong_dims, nan_state, unknown, 42, good[1]]))
    assert reply["accepted"] == [good[0]["id"], good[1]["id"]]
    errors = [r["error"] for r in reply["rejected"]]
    assert errors[0].startswith("corrected_chunk:") and "(16, 24)" in errors[0]
    assert errors[1].startswith("proprio:") and "finite" in errors[1]
    assert errors[2].startswith("embodiment:") and errors[3].startswith("correction:")
    stats = ray.get(handle.stats.remote())
    assert stats["rejected"] == {"leap": 1, "hello": 1, "_unknown": 2} and stats["rejected_total"] == 4
    assert stats["accepted"] == {"leap": 2}
    assert ray.get(handle.add.remote(dicts(1, "hello", seed=10)))["accepted"]
    sample = ray.get(handle.sample.remote("leap", 5, "recency", 0))
    assert len(sample) == 5 and all(validate_correction(c) == c for c in sample)


def test_start_replay_actor_reuses_the_named_actor_and_guards_its_log(ray_session, replay, tmp_path):
    from actors.replay import start_replay_actor

    start, _, name = replay
    handle = start()
    ray_session.get(handle.add.remote(dicts(1, "aloha", seed=11)))
    same = start()
    assert ray_session.get(same.counts.remote())["aloha"]["total_added"] == 1
    with pytest.raises(ValueError, match="already serves"):
        start_replay_actor(tmp_path / "other-log", name=name)
