"""Chaos on the serving side, against a real replica: a flood of pipelined frames nobody reads, 1,000 half-sent
frames, an oversize chunked HTTP body, poisoned heads from the registry, a replica stopped with SIGSTOP.
What must hold: replica memory bounded, a robot within its limits keeps being served, no restart, the old
head keeps serving, and every refusal is counted."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from fleet.learning.head_store import HeadStore
from fleet.policy.checkpoint import head_to_bytes
from fleet.policy.train import build_model
from tests.chaos.conftest import NAMES
from tests.chaos.flood import (
    Robot,
    endpoint_of,
    flood,
    frame,
    hello_frame,
    replica_pid,
    request_wire,
    rss_mb,
    start_policy_app,
    token_for,
)
from tests.mocks.poisoned_heads import poisoned
from tests.mocks.tiny_policy import TINY

pytestmark = [pytest.mark.chaos, pytest.mark.ray]


def report(name: str, figures: dict) -> None:
    print(f"\nCHAOS {name}: {json.dumps(figures)}")


class LaxStore(HeadStore):
    """A registry that also stores bytes unchecked: one from before heads were checked, or a tampered disk.
    The replica is the second line of defence and must hold on its own."""

    def publish_unchecked(self, name: str, version: int, payload: bytes) -> int:
        self._payloads.setdefault(name, {})[version] = bytes(payload)
        self._meta.setdefault(name, {})[version] = {"name": name, "version": version, "meta": {}}
        return version


@pytest.fixture(scope="module")
def app(ray_session, checkpoint):
    """One replica polling a lax registry; deleted after the module."""
    from ray import serve

    from deployments.http import start_serve

    ray = ray_session
    tag = os.urandom(3).hex()
    registry = ray.remote(num_cpus=0)(LaxStore).options(name=f"lax-heads-{tag}").remote()
    start_serve(port=None)
    handle = start_policy_app(
        checkpoint, f"chaos-{tag}", registry=f"lax-heads-{tag}", poll_interval_s=0.1, direct_request_timeout_s=2.0
    )
    assert "error" in handle.act.remote({"bad": 1}).result(timeout_s=120)  # up and answering
    yield handle, registry
    serve.delete(f"chaos-{tag}")
    ray.kill(registry)


def test_a_flood_of_pipelined_frames_nobody_reads_keeps_the_replica_bounded(app) -> None:
    handle, _ = app
    figures = flood(handle, connections=4, seconds=20.0)
    report("flood", figures)
    assert figures["frames_sent"] > 1000
    # before: four such connections grew a replica by 4.3 GB in 25 s
    assert figures["rss_peak_mb"] - figures["rss_before_mb"] < 300
    # refusals (figures["refused"]) depend on timing: on a quiet machine backpressure alone can hold every
    # connection under its in-flight cap; the caps themselves are tests/unit/serving/test_direct_limits.py's
    assert figures["robot_replies"] >= 20 and figures["robot_errors"] == 0
    assert figures["replica_pid_after"] == figures["replica_pid"]  # never restarted


def test_a_thousand_half_sent_frames_are_dropped_and_a_connected_robot_is_served(app) -> None:
    handle, _ = app
    endpoint, pid = endpoint_of(handle), replica_pid(handle)
    before = rss_mb(pid)
    stop = threading.Event()
    robot = Robot(endpoint, stop)
    robot.start()
    time.sleep(0.5)
    whole = frame(request_wire("half", 1))
    socks, refused_at_connect = [], 0
    for k in range(1000):
        try:
            sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=2)
        except OSError:
            refused_at_connect += 1
            continue
        if k % 2:  # authenticated, then a header and half a body
            sock.sendall(hello_frame(token_for(endpoint)) + whole[: len(whole) // 2])
        else:  # half a hello
            sock.sendall(hello_frame(token_for(endpoint))[:6])
        socks.append(sock)
    peak = rss_mb(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the hello (2 s) and frame (5 s) deadlines drop them all
        peak = max(peak, rss_mb(pid))
        direct = handle.stats.remote().result(timeout_s=60)["direct"]
        if direct["connections"] <= 1:
            break
        time.sleep(0.5)
    stop.set()
    robot.join(10)
    for sock in socks:
        sock.close()
    refused = direct["refused"]
    figures = {
        "opened": len(socks),
        "refused_at_connect": refused_at_connect,
        "refused": refused,
        "connections_left": direct["connections"],
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "robot_replies": robot.replies,
        "robot_errors": robot.errors + robot.no_answer,
    }
    report("half-sent frames", figures)
    assert direct["connections"] <= 1  # only the robot's, if it is between two requests
    dropped = refused.get("connections", 0) + refused.get("hello_timeout", 0) + refused.get("frame_timeout", 0)
    assert dropped >= 1000 - refused_at_connect
    assert peak - before < 200
    assert robot.replies >= 20 and robot.errors + robot.no_answer == 0
    assert replica_pid(handle) == pid


def test_an_oversize_chunked_body_is_refused_while_it_streams(ray_session, checkpoint, tag) -> None:
    import httpx
    from ray import serve

    from deployments.http import build_http_app, start_serve

    address = start_serve(port=None)
    cfg = {"checkpoint": checkpoint, "threads": 1, "replica_cpus": 0.5, "registry": None, "max_body_bytes": 1 << 20}
    serve.run(build_http_app(cfg), name=f"chaos-http-{tag}", route_prefix=f"/chaos-{tag}")
    offered = []

    def chunks():
        for _ in range(1024):  # 64 MB offered in 64 kB chunks, no Content-Length
            offered.append(1)
            yield b"x" * 65536

    try:
        with httpx.Client(base_url=f"{address}/chaos-{tag}", timeout=120) as client:
            r = client.post("/v1/act", content=chunks(), headers={"Content-Type": "application/json"})
            figures = {"status": r.status_code, "error": r.json()["error"], "chunks_offered": len(offered)}
            ok = client.post("/v1/act", json={"request_id": "x"})
    finally:
        serve.delete(f"chaos-http-{tag}")
    report("oversize chunked body", figures)
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert ok.status_code == 422  # the ingress keeps answering (a request missing its fields)


def test_poisoned_heads_are_refused_the_old_head_keeps_serving_and_nothing_restarts(app) -> None:
    handle, registry = app
    ray = pytest.importorskip("ray")
    pid = replica_pid(handle)
    franka = handle.head_versions.remote().result(timeout_s=60)["franka"]
    good = head_to_bytes(build_model(NAMES, 1, TINY), "franka", 1)
    kinds = poisoned(good)
    versions = []
    for k, bad in enumerate(kinds.values()):  # one at a time: a replica only ever tries the newest version
        ray.get(registry.publish_unchecked.remote("franka", franka + 1 + k, bad))
        deadline = time.monotonic() + 10
        while not any(
            r["version"] == franka + 1 + k for r in handle.stats.remote().result(timeout_s=60)["refused_heads"]
        ):
            assert time.monotonic() < deadline, f"version {franka + 1 + k} neither installed nor refused"
            versions.append(handle.act.remote(request_wire("r", k)).result(timeout_s=60)["head_version"])
            time.sleep(0.1)
    for i in range(30):  # served throughout, by the head it had
        reply = handle.act.remote(request_wire(f"r{i}", i)).result(timeout_s=60)
        assert "error" not in reply and np.isfinite(reply["chunk"]).all()
        versions.append(reply["head_version"])
        time.sleep(0.1)
    assert set(versions) == {franka}
    handle.check_health.remote().result(timeout_s=60)  # healthy: a refused head is no reason to restart
    stats = handle.stats.remote().result(timeout_s=60)
    refused = {r["version"]: r["error"] for r in stats["refused_heads"] if r["embodiment"] == "franka"}
    assert len(refused) == len(kinds)
    deadline = time.monotonic() + 10
    while True:  # and the registry hears of each refusal, so a learner can act on it
        serving = ray.get(registry.serving.remote())
        listed = [x for v in serving.values() for x in v["refused"]]
        if len(listed) >= len(kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(listed) >= len(kinds)
    good_version = franka + 1 + len(kinds)
    ray.get(registry.publish_unchecked.remote("franka", good_version, good))
    deadline = time.monotonic() + 10
    while handle.head_versions.remote().result(timeout_s=60)["franka"] != good_version:
        assert time.monotonic() < deadline, "the next good head was never installed"
        time.sleep(0.2)
    assert replica_pid(handle) == pid
    report("poisoned heads", {"refused": refused, "installed_after": good_version, "restarts": 0})


def test_a_stopped_replica_recovers_without_a_restart_and_memory_stays_bounded(app) -> None:
    handle, _ = app
    endpoint, pid = endpoint_of(handle), replica_pid(handle)
    before = rss_mb(pid)
    stop = threading.Event()
    robot = Robot(endpoint, stop)
    robot.start()
    time.sleep(1.0)
    served_before = robot.replies
    os.kill(pid, signal.SIGSTOP)
    try:
        # meanwhile a client keeps sending into the stopped replica's socket buffers
        sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=2)
        sock.sendall(hello_frame(token_for(endpoint)))
        sock.settimeout(0.2)
        sent, data = 0, frame(request_wire("while-stopped", 1))
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            try:
                sock.sendall(data)
                sent += 1
            except TimeoutError:
                pass
        during = robot.replies
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while robot.replies < during + 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    robot.join(10)
    sock.close()
    figures = {
        "stopped_s": 3.0,
        "frames_sent_while_stopped": sent,
        "robot_replies_before": served_before,
        "robot_replies_while_stopped": during - served_before,
        "robot_replies_after": robot.replies - during,
        "robot_timeouts": robot.no_answer,
        "rss_before_mb": round(before, 1),
        "rss_after_mb": round(rss_mb(pid), 1),
    }
    report("SIGSTOP replica", figures)
    assert robot.replies >= during + 20  # served again after SIGCONT
    assert replica_pid(handle) == pid  # recovered, not restarted
    assert rss_mb(pid) - before < 200
