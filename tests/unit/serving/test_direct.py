"""The direct route without Ray: frames over a real localhost socket between DirectServer (on an asyncio loop in
a thread) and DirectConnection, garbage handling, cancelled replies, endpoint choice, the client's fallback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from actors.robot_io import DirectClient, pick_endpoint
from fleet.embodiments import EMBODIMENTS
from fleet.protocol import make_request, validate_request
from fleet.serving.direct import HEADER, MAX_FRAME, DirectConnection, DirectServer, hello, pack

TOKEN = "test-token"


def obs(i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS["franka"].proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }


class LoopThread:
    """A DirectServer whose act validates the request like PolicyRuntime and echoes what it received."""

    def __init__(self, delay_for: dict[str, float] | None = None) -> None:
        self.delay_for = delay_for or {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DirectServer(self.act, TOKEN)
        self.host, self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    async def act(self, raw: dict) -> dict:
        await asyncio.sleep(self.delay_for.get(raw.get("request_id"), 0.0))
        if raw.get("robot_id") == "crash":
            raise RuntimeError("model exploded")
        try:
            req = validate_request(raw, EMBODIMENTS)
        except ValueError as exc:
            return {"error": str(exc), "request_id": raw.get("request_id")}
        return {
            "request_id": req["request_id"],
            "embodiment": req["embodiment"],
            "chunk": np.full((16, 7), float(req["image"].mean()), np.float32),
            "image_sum": int(req["image"].astype(np.int64).sum()),
        }

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server():
    s = LoopThread(delay_for={"slow:1": 0.3})
    yield s
    s.close()


def wait_reply(conn: DirectConnection, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = conn.poll(0.05)
        if reply is not None:
            return reply
    raise AssertionError("no reply")


def test_round_trip_carries_the_image_bytes_and_float32_arrays(server) -> None:
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    o = obs(3)
    conn.submit(make_request("r0", "franka", o, obs_tick=7))
    reply = wait_reply(conn)
    assert reply["request_id"] == "r0:7" and reply["embodiment"] == "franka"
    assert reply["image_sum"] == int(o["image"].astype(np.int64).sum())
    assert reply["chunk"].dtype == np.float32 and reply["chunk"].shape == (16, 7)
    assert conn.poll(0.0) is None  # nothing outstanding
    conn.close()


def test_bad_request_and_garbage_frames_get_error_replies_and_the_connection_keeps_working(server) -> None:
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    bad = make_request("r0", "franka", obs(), obs_tick=1)
    bad["proprio"] = np.zeros(3, np.float32)  # franka wants 7 values
    conn.submit(bad)
    assert "proprio" in wait_reply(conn)["error"]
    # a frame that is not msgpack: answered with an error naming the frame, the stream stays in step
    conn._sock.setblocking(True)
    conn._sock.sendall(HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1")
    conn._sock.setblocking(False)
    conn._want = "whatever"
    assert wait_reply(conn)["error"].startswith("frame: not msgpack")
    conn.submit(make_request("r0", "franka", obs(), obs_tick=2))
    assert wait_reply(conn)["request_id"] == "r0:2"
    assert server.server.bad_frames == 1
    conn.submit(make_request("crash", "franka", obs(), obs_tick=3))  # the server's act raises: answered anyway
    reply = wait_reply(conn)
    assert reply["request_id"] == "crash:3" and reply["error"] == "internal: RuntimeError: model exploded"
    conn.submit(make_request("r0", "franka", obs(), obs_tick=4))
    assert wait_reply(conn)["request_id"] == "r0:4"
    conn.close()


def test_an_oversized_frame_header_closes_that_connection_only(server) -> None:
    raw = socket.create_connection((server.host, server.port))
    raw.sendall(pack(hello(TOKEN)) + HEADER.pack(MAX_FRAME + 1))
    raw.settimeout(5)
    head = raw.recv(HEADER.size)
    assert HEADER.unpack(head)[0] > 0  # the error reply, then the server hangs up
    raw.close()
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    conn.submit(make_request("r1", "franka", obs(), obs_tick=1))
    assert wait_reply(conn)["request_id"] == "r1:1"
    conn.close()


def test_the_reply_to_a_cancelled_request_is_dropped(server) -> None:
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    conn.submit(make_request("slow", "franka", obs(), obs_tick=1))  # answered after 0.3 s
    conn.cancel()
    conn.submit(make_request("fast", "franka", obs(), obs_tick=2))
    assert wait_reply(conn)["request_id"] == "fast:2"
    time.sleep(0.4)
    assert conn.poll(0.1) is None  # the slow reply arrived and was discarded
    conn.close()


def test_a_closed_server_raises_connection_error_on_poll(server) -> None:
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    conn.submit(make_request("slow", "franka", obs(), obs_tick=1))
    deadline = time.monotonic() + 5
    while server.server.requests == 0 and time.monotonic() < deadline:  # accepted and being answered
        time.sleep(0.01)
    server.close()
    with pytest.raises(ConnectionError):
        for _ in range(100):
            conn.poll(0.05)
    conn.close()


def test_pick_endpoint_prefers_its_node_and_never_picks_another_nodes_loopback() -> None:
    eps = [
        {"host": "127.0.0.1", "port": 1, "node_id": "a", "replica": "r1"},
        {"host": "127.0.0.1", "port": 2, "node_id": "a", "replica": "r2"},
        {"host": "127.0.0.1", "port": 3, "node_id": "b", "replica": "r3"},
    ]
    assert pick_endpoint(eps, "robot-0", "c") is None  # only loopback sockets of other nodes
    picks = {pick_endpoint(eps, f"robot-{i}", "a")["port"] for i in range(32)}
    assert picks == {1, 2}  # spread over this node's replicas
    assert pick_endpoint(eps, "robot-5", "a") == pick_endpoint(list(reversed(eps)), "robot-5", "a")  # stable
    routable = eps + [{"host": "10.0.0.2", "port": 4, "node_id": "b", "replica": "r4"}]
    assert pick_endpoint(routable, "robot-0", "c")["port"] == 4


class FakeGateway:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def submit(self, request: dict) -> None:
        self.sent.append(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        return {"request_id": self.sent[-1]["request_id"], "via": "gateway"} if self.sent else None

    def cancel(self) -> None:
        pass


def test_direct_client_uses_the_socket_and_falls_back_to_the_gateway_when_it_breaks(server) -> None:
    client = DirectClient("robot-0", "app", "ns", "registry")
    client._gateway = FakeGateway()
    client._connection = lambda: client._conn  # no registry here: the test hands it the connection
    client._conn = DirectConnection(server.host, server.port, token=TOKEN)
    client.submit(make_request("robot-0", "franka", obs(), obs_tick=1))
    deadline = time.monotonic() + 5
    reply = None
    while reply is None and time.monotonic() < deadline:
        reply = client.poll(0.05)
    assert reply["request_id"] == "robot-0:1" and "via" not in reply
    assert client.stats()["direct_calls"] == 1 and client.stats()["direct_connects"] == 0  # handed, not dialled
    # the replica goes away with a request in flight: the same request is resent through the gateway
    client.submit(make_request("slow", "franka", obs(), obs_tick=1))
    deadline = time.monotonic() + 5
    while server.server.requests < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.close()
    reply = None
    deadline = time.monotonic() + 5
    while reply is None and time.monotonic() < deadline:
        reply = client.poll(0.05)
    assert reply == {"request_id": "slow:1", "via": "gateway"}
    assert client.stats()["direct_connected"] is False and client.stats()["gateway_calls"] == 1
    # with no connection, requests go through the gateway
    client.submit(make_request("robot-0", "franka", obs(), obs_tick=3))
    assert client.poll(0.0)["via"] == "gateway"
