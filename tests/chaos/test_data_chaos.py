"""Chaos on the data side, with the real actors: a corrupt Parquet part and a truncated registry file under
actors Ray restarts, and a replay actor killed again and again while corrections are being acknowledged.
What must hold: the actors start, the bad files are set aside and counted, and no acknowledged correction
is lost."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest

from fleet.data.correction import random_correction, validate_correction
from fleet.data.store import ReplayStore
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.train import build_model
from tests.chaos.conftest import NAMES
from tests.mocks.tiny_policy import TINY

pytestmark = [pytest.mark.chaos, pytest.mark.ray]


def report(name: str, figures: dict) -> None:
    print(f"\nCHAOS {name}: {json.dumps(figures)}")


def stats_after_restart(ray, actor, old_pid: int) -> dict:
    """The actor's stats once its restarted incarnation answers (calls fail or reach the old one until then)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            stats = ray.get(actor.stats.remote(), timeout=30)
            if stats["pid"] != old_pid:
                return stats
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        time.sleep(0.3)
    raise AssertionError("the actor did not come back")


def batch(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [validate_correction(random_correction("franka", rng)).to_dict() for _ in range(n)]


def test_a_replay_actor_starts_from_a_corrupt_log_and_sets_the_bad_parts_aside(ray_session, tmp_path) -> None:
    from actors.replay import start_replay_actor

    ray = ray_session
    store = ReplayStore(tmp_path / "log", compact_every=None)
    acked = [set(store.add(batch(10, seed)).get("accepted")) for seed in range(4)]
    parts = store.log.parts()
    parts[1].path.write_bytes(parts[1].path.read_bytes()[:2000])  # a torn part
    (tmp_path / "log" / "part-00000099.parquet").write_bytes(b"\x00" * 5000)  # garbage under a part's name
    name = f"replay-{uuid.uuid4().hex[:6]}"
    replay = start_replay_actor(tmp_path / "log", name=name)  # before: the constructor raised, Ray restarted it forever
    try:
        stats = ray.get(replay.stats.remote())
        assert len(stats["quarantined_at_start"]) == 2 and stats["log"]["quarantined"] == 2
        held = {c.id for c in ray.get(replay.since.remote("franka", 0))["corrections"]}
        assert held == acked[0] | acked[2] | acked[3]
        ray.kill(replay, no_restart=False)  # a restart finds a clean log
        again = stats_after_restart(ray, replay, stats["pid"])
        assert again["quarantined_at_start"] == [] and again["loaded_at_start"] == 30
    finally:
        ray.kill(replay, no_restart=True)
    report("corrupt parquet", {"quarantined": stats["quarantined_at_start"], "loaded": stats["loaded_at_start"]})


def test_a_truncated_registry_file_leaves_the_registry_serving_the_version_before(ray_session, tmp_path) -> None:
    from actors.heads import get_head_registry

    ray = ray_session
    name = f"heads-{uuid.uuid4().hex[:6]}"
    registry = get_head_registry(name, persist_dir=tmp_path / "heads")
    try:
        for seed in (0, 1):
            ray.get(registry.publish.remote("franka", None, head_to_bytes(build_model(NAMES, seed, TINY), "franka")))
        path = tmp_path / "heads" / "franka" / "v000002.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        old_pid = ray.get(registry.stats.remote())["pid"]
        ray.kill(registry, no_restart=False)
        stats = stats_after_restart(ray, registry, old_pid)
        assert stats["latest"] == {"franka": 1} and len(stats["skipped_at_load"]) == 1
        # and it keeps accepting the next head
        payload = head_to_bytes(build_model(NAMES, 2, TINY), "franka")
        assert ray.get(registry.publish.remote("franka", None, payload)) == 2
    finally:
        ray.kill(registry, no_restart=True)
    report("truncated registry file", {"latest_after_restart": 1, "skipped": stats["skipped_at_load"]})


def test_no_acknowledged_correction_is_lost_while_the_replay_actor_is_killed(ray_session, tmp_path) -> None:
    from actors.replay import start_replay_actor

    ray = ray_session
    name = f"replay-{uuid.uuid4().hex[:6]}"
    replay = start_replay_actor(tmp_path / "log", capacity=5000, name=name)
    acked: set[str] = set()
    offered = 0
    stop = threading.Event()
    errors: list[str] = []

    def robot() -> None:
        nonlocal offered
        seed = 0
        while not stop.is_set():
            seed += 1
            items = batch(5, 1000 + seed)
            offered += len(items)
            try:  # as a robot does: an answer is an acknowledgement; no answer, nothing assumed
                ack = ray.get(replay.add.remote(items), timeout=60)
            except Exception as exc:  # noqa: BLE001 - recorded; the robot would resend
                errors.append(type(exc).__name__)
                continue
            acked.update(ack["accepted"] + ack["duplicates"])

    thread = threading.Thread(target=robot)
    thread.start()
    kills = 0
    try:
        for _ in range(6):
            time.sleep(1.0)
            ray.kill(replay, no_restart=False)
            kills += 1
    finally:
        time.sleep(1.0)
        stop.set()
        thread.join(120)
    found = {c.id for c in ray.get(replay.since.remote("franka", 0), timeout=120)["corrections"]}
    ray.kill(replay, no_restart=True)
    restarted = ReplayStore(tmp_path / "log", capacity=5000)  # and from the log alone, as the next start reads it
    on_disk = {c.id for c in restarted.buffer.items("franka")}
    figures = {
        "kills": kills,
        "offered": offered,
        "acknowledged": len(acked),
        "found_in_actor": len(acked & found),
        "found_after_restart": len(acked & on_disk),
        "call_errors": len(errors),
    }
    report("replay kills", figures)
    assert acked and acked <= found and acked <= on_disk
