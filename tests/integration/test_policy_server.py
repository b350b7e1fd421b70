"""PolicyServer on a real local Ray: round trips for every embodiment through a DeploymentHandle, per-request
rejection, health, and a head hot swap that reaches every replica within a second under load."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import head_to_bytes, save_checkpoint
from fleet.policy.train import build_model
from fleet.protocol import make_request
from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray

NAMES = tuple(EMBODIMENTS)[:4]


def request(name: str, i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    spec = EMBODIMENTS[name]
    obs = {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(spec.proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }
    return make_request(f"robot-{i}", name, obs, obs_tick=i, n_samples=3 if spec.head == "flow" else 1)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    """Two replicas of a tiny policy polling a private HeadRegistry; deleted after the module."""
    from ray import serve

    from actors.heads import get_head_registry
    from deployments.http import start_serve
    from deployments.policy import build_app

    ray = ray_session
    ckpt = tmp_path_factory.mktemp("policy") / "policy"
    save_checkpoint(build_model(NAMES, 0, TINY), ckpt)
    tag = uuid.uuid4().hex[:6]
    registry_name, app_name = f"heads-{tag}", f"policy-test-{tag}"
    registry = get_head_registry(registry_name)
    start_serve(port=None)
    config = {
        "checkpoint": str(ckpt),
        "num_replicas": 2,
        "replica_cpus": 0.5,
        "threads": 1,
        "registry": registry_name,
        "poll_interval_s": 0.1,
        "max_batch_size": 16,
    }
    handle = serve.run(build_app(config), name=app_name, route_prefix=None)
    yield handle, registry
    serve.delete(app_name)
    ray.kill(registry)


def test_act_round_trip_for_every_embodiment(server) -> None:
    handle, _ = server
    responses = [handle.act.remote(request(name, i)) for i, name in enumerate(NAMES)]
    for i, (name, response) in enumerate(zip(NAMES, responses, strict=True)):
        reply = response.result(timeout_s=60)
        spec = EMBODIMENTS[name]
        assert "error" not in reply, reply
        assert reply["embodiment"] == name and reply["request_id"] == f"robot-{i}:{i}"
        assert reply["chunk"].shape == (16, spec.action_dim) and reply["chunk"].dtype == np.float32
        assert reply["head_version"] == 1 and reply["server_timing"]["batch_size"] >= 1
        if spec.head == "flow":
            assert reply["samples"].shape == (3, 16, spec.action_dim)
        else:
            assert reply["entropy"].shape == (16, spec.action_dim)


def test_malformed_request_is_answered_and_the_replica_keeps_serving(server) -> None:
    handle, _ = server
    bad = request("franka") | {"proprio": np.zeros(3, np.float32)}
    pending = [handle.act.remote(bad), handle.act.remote(request("hello"))]
    bad_reply, good_reply = (r.result(timeout_s=60) for r in pending)
    assert bad_reply["error"].startswith("proprio:") and "8" in bad_reply["error"]
    assert "error" not in good_reply
    assert handle.check_health.remote().result(timeout_s=30) is None
    stats = handle.stats.remote().result(timeout_s=30)
    assert stats["requests"] >= 1 and stats["hot_swap_error"] is None


def test_direct_socket_of_every_replica_is_listed_and_serves_the_same_batches(server) -> None:
    from fleet.serving.direct import HEADER, DirectConnection

    handle, registry = server
    ray = pytest.importorskip("ray")
    deadline = time.monotonic() + 30
    while len(endpoints := ray.get(registry.endpoints.remote())) < 2:
        assert time.monotonic() < deadline, f"replicas did not report their direct sockets: {endpoints}"
        time.sleep(0.2)
    assert {e["replica"] for e in endpoints} == set(ray.get(registry.serving.remote()))
    for k, endpoint in enumerate(endpoints):
        conn = DirectConnection(endpoint["host"], endpoint["port"], token=endpoint.get("token"))
        conn.submit(request("aloha", 50 + k))
        reply = None
        while reply is None and time.monotonic() < deadline:
            reply = conn.poll(0.1)
        assert reply["request_id"] == f"robot-{50 + k}:{50 + k}" and reply["chunk"].shape == (16, 14)
        assert reply["server_timing"]["replica"] == endpoint["replica"] and reply["head_version"] >= 1
        # garbage on the socket: an error reply naming the frame; the replica keeps serving both routes
        conn._sock.setblocking(True)
        conn._sock.sendall(HEADER.pack(3) + b"\xc1\xc1\xc1")
        conn._sock.setblocking(False)
        conn._want = "garbage"
        reply = None
        while reply is None and time.monotonic() < deadline:
            reply = conn.poll(0.1)
        assert reply["error"].startswith("frame:")
        conn.submit(request("leap", 60 + k))
        reply = None
        while reply is None and time.monotonic() < deadline:
            reply = conn.poll(0.1)
        assert "error" not in reply and reply["chunk"].shape == (16, 24)
        conn.close()
    assert "error" not in handle.act.remote(request("hello")).result(timeout_s=60)


def test_published_head_reaches_every_replica_within_a_second(server) -> None:
    handle, registry = server
    ray = pytest.importorskip("ray")
    seen: list[tuple[float, float, int, str]] = []  # (sent, received, franka head version, replica)
    errors: list[str] = []
    stop = threading.Event()

    def stream(k: int) -> None:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                reply = handle.act.remote(request("franka", k * 1000 + i)).result(timeout_s=30)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                errors.append(repr(exc))
                continue
            if "error" in reply:
                errors.append(reply["error"])
            else:
                seen.append((sent, time.monotonic(), reply["head_version"], reply["server_timing"]["replica"]))
            i += 1

    streams = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
    for t in streams:
        t.start()
    time.sleep(0.5)
    payload = head_to_bytes(build_model(NAMES, 1, TINY), "franka", 2)
    published = time.monotonic()
    assert ray.get(registry.publish.remote("franka", 2, payload, {"by": "test"})) == 2
    time.sleep(1.6)
    stop.set()
    for t in streams:
        t.join(timeout=60)

    assert not errors
    before = {rep for s, _, v, rep in seen if s < published and v == 1}
    after = [(v, rep) for s, _, v, rep in seen if s >= published + 1.0]
    assert len(before) == 2, "both replicas should have served the old head under load"
    assert after and {v for v, _ in after} == {2}, "a request sent 1 s after publishing got the old head"
    assert {rep for _, rep in after} == before, "every replica serves the new head"
    versions = [rep_info["versions"]["franka"] for rep_info in ray.get(registry.serving.remote()).values()]
    assert versions == [2, 2]


def test_a_robots_image_adapter_reaches_every_replica_and_changes_only_its_frames(server) -> None:
    """The learner's per-robot adapter, set in the registry, is served by both replicas within a poll or two;
    the same frame from that robot and from another then reach the policy differently (its chunk may differ),
    while the other robot's replies stay what they were."""
    handle, registry = server
    ray = pytest.importorskip("ray")
    adapter = {"dx": 3, "dy": -2, "gain": [1.6, 1.6, 1.6], "bias": [-0.2, -0.1, 0.0]}
    before = handle.act.remote(request("franka", 7) | {"robot_id": "robot-plain"}).result(timeout_s=30)
    version = ray.get(registry.set_image_adapter.remote("robot-dim", adapter, {"by": "test"}))
    replicas: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(replicas) < 2 or any(v["version"] < version for v in replicas.values())):
        stats = handle.stats.remote().result(timeout_s=30)
        replicas[stats["replica"]] = stats["image_adapters"]
        time.sleep(0.05)
    assert len(replicas) == 2 and all(v == {"version": version, "robots": ["robot-dim"]} for v in replicas.values())
    after = handle.act.remote(request("franka", 7) | {"robot_id": "robot-plain"}).result(timeout_s=30)
    assert np.array_equal(before["chunk"], after["chunk"])  # another robot's frames: untouched
    ray.get(registry.set_image_adapter.remote("robot-dim", None))
