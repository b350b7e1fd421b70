"""HeadStore (the HeadRegistry actor's logic, no Ray): versions, rollback, persistence, replica endpoints."""

from __future__ import annotations

import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.learning.head_store import HeadStore
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.train import build_model
from tests.mocks.tiny_policy import TINY

NAMES = tuple(EMBODIMENTS)[:4]


def tiny_model(seed: int = 0):
    return build_model(NAMES, seed, TINY)


def test_head_store_lists_direct_endpoints_of_live_replicas() -> None:
    store = HeadStore()
    store.report_serving("r2", {"franka": 1}, {"host": "127.0.0.1", "port": 2, "node_id": "a", "replica": "r2"})
    store.report_serving("r1", {"franka": 1}, {"host": "127.0.0.1", "port": 1, "node_id": "b", "replica": "r1"})
    store.report_serving("r3", {"franka": 1})  # a replica without a direct socket
    assert [e["port"] for e in store.endpoints()] == [1, 2]
    assert [e["port"] for e in store.endpoints(node_id="a")] == [2]
    store._serving["r1"]["at"] -= 60  # went silent a minute ago
    assert [e["port"] for e in store.endpoints()] == [2]


def test_head_store_versions_only_increase_and_rollback_republishes(tmp_path) -> None:
    model = tiny_model(0)
    store = HeadStore(tmp_path / "heads")
    v1, v2 = head_to_bytes(model, "franka", 1), head_to_bytes(tiny_model(1), "franka", 2)
    assert store.publish("franka", None, v1, {"note": "first"}) == 1
    assert store.publish("franka", 2, v2) == 2
    assert store.publish("franka", 2, v2) == 2  # a retried publish is answered, not refused
    with pytest.raises(ValueError, match="not above"):
        store.publish("franka", 2, v1)
    with pytest.raises(ValueError, match="hello"):
        store.publish("franka", 3, head_to_bytes(model, "hello", 3))
    assert store.latest() == {"franka": 2}
    assert store.get("franka") == (2, v2) and store.get("franka", 1) == (1, v1)
    with pytest.raises(KeyError):
        store.get("aloha")
    assert store.rollback("franka", 1) == 3
    assert store.get("franka") == (3, v1)
    history = store.history("franka")
    assert [h["version"] for h in history] == [1, 2, 3] and history[2]["meta"] == {"rollback_of": 1}

    reloaded = HeadStore(tmp_path / "heads")  # a restarted actor keeps every version
    assert reloaded.latest() == {"franka": 3} and reloaded.get("franka", 2) == (2, v2)
    assert not list((tmp_path / "heads").rglob("*.tmp"))
