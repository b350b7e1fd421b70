"""The direct socket's limits without Ray: authentication, connection cap, in-flight caps, reply backpressure,
half-sent frames and request deadlines. Each refusal is answered with an error naming the limit and counted,
and a robot within the limits keeps being served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from fleet.protocol import make_request, request_to_wire
from fleet.serving.direct import HEADER, DirectConnection, DirectLimits, DirectServer, hello, pack, unpack

TOKEN = "s3cret-token"


def obs(i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(7).astype(np.float32),
        "instruction": "pick up the red cube",
    }


class Server:
    """A DirectServer on its own loop thread whose act waits `delay_s` and answers `reply_bytes` of payload."""

    def __init__(self, limits: DirectLimits, delay_s: float = 0.0, reply_bytes: int = 0) -> None:
        self.delay_s, self.reply_bytes = delay_s, reply_bytes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = DirectServer(self.act, TOKEN, limits)
        self.host, self.port = self.call(self.server.start())
        self.peak_in_flight = 0
        self.peak_write_buffer = 0

    async def act(self, raw: dict) -> dict:
        self.peak_in_flight = max(self.peak_in_flight, self.server.in_flight)
        await asyncio.sleep(raw.get("delay_s", self.delay_s) if isinstance(raw.get("delay_s"), float) else self.delay_s)
        return {"request_id": raw.get("request_id"), "blob": b"x" * self.reply_bytes}

    def call(self, coro, timeout: float = 5.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def write_buffers(self) -> int:
        async def sizes() -> int:
            return sum(w.transport.get_write_buffer_size() for w in self.server._writers)

        return self.call(sizes())

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def make_server():
    made: list[Server] = []

    def make(**kwargs) -> Server:
        limits = kwargs.pop("limits", DirectLimits())
        made.append(Server(limits, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def wait_reply(conn: DirectConnection, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = conn.poll(0.05)
        if reply is not None:
            return reply
    raise AssertionError("no reply")


def read_frame(sock: socket.socket) -> dict | None:
    """One frame from a blocking socket, or None when the server hung up."""
    head = b""
    while len(head) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = HEADER.unpack(head)
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
    return unpack(body)


def robot_is_served(server: Server, tick: int) -> bool:
    conn = DirectConnection(server.host, server.port, token=TOKEN)
    try:
        conn.submit(make_request("robot-ok", "franka", obs(tick), obs_tick=tick))
        return wait_reply(conn)["request_id"] == f"robot-ok:{tick}"
    finally:
        conn.close()


def request_frame(i: int) -> bytes:
    return pack(request_to_wire(make_request("flood", "franka", obs(0), obs_tick=i), binary=True))


def test_a_wrong_token_or_no_hello_is_refused_and_counted(make_server) -> None:
    s = make_server()
    for first in (pack(hello("wrong")), request_frame(0), pack({"hello": "fleet-direct/1"})):
        sock = socket.create_connection((s.host, s.port), timeout=5)
        sock.sendall(first)
        reply = read_frame(sock)
        assert reply is not None and reply["error"].startswith("direct:")
        assert read_frame(sock) is None  # then it hangs up
        sock.close()
    assert s.server.refused["auth"] == 3
    assert s.server.requests == 0
    conn = DirectConnection(s.host, s.port, token="wrong")
    conn.submit(make_request("r", "franka", obs(), obs_tick=1))
    assert "authentication failed" in wait_reply(conn)["error"]
    with pytest.raises(OSError):  # the server hung up: the next request fails (the robot uses the gateway)
        conn.submit(make_request("r", "franka", obs(), obs_tick=2))
        for _ in range(100):
            conn.poll(0.05)
    assert robot_is_served(s, 2)


def flood(server: Server, frames: int = 3000) -> int:
    """Pipeline `frames` requests on one connection without ever reading; returns how many were sent before
    the server stopped reading (sendall blocked for 0.5 s)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.sendall(pack(hello(TOKEN)))
    frame = request_frame(1)
    sent = 0
    sock.settimeout(0.5)
    try:
        for _ in range(frames):
            sock.sendall(frame)
            sent += 1
    except TimeoutError:
        pass  # the server stopped reading this connection
    server.flood_socket = sock  # kept open (and unread) until the server closes
    return sent


def test_a_client_pipelining_without_reading_holds_bounded_work_and_others_are_served(make_server) -> None:
    limits = DirectLimits(max_in_flight_per_connection=4, write_buffer_bytes=64 << 10)
    s = make_server(limits=limits, delay_s=0.01)
    sent = flood(s)
    assert s.peak_in_flight <= limits.max_in_flight_per_connection
    assert s.server.refused["in_flight_connection"] > 0  # the rest were refused and counted
    assert s.server.requests + s.server.refused["in_flight_connection"] <= sent
    assert s.write_buffers() <= limits.write_buffer_bytes + 64 << 10
    assert robot_is_served(s, 2)  # a robot within its limits is served meanwhile


def test_replies_a_client_does_not_read_stop_its_reading(make_server) -> None:
    limits = DirectLimits(max_in_flight_per_connection=64, write_buffer_bytes=64 << 10)
    s = make_server(limits=limits, reply_bytes=20_000)
    sent = flood(s)
    assert sent < 3000  # backpressure: the server stopped reading once its replies piled up
    # what waits to be written is bounded by the high-water mark plus the replies already in flight
    assert s.write_buffers() <= limits.write_buffer_bytes + limits.max_in_flight_per_connection * 21_000
    assert robot_is_served(s, 3)


def test_half_sent_frames_and_silent_connections_are_dropped(make_server) -> None:
    s = make_server(limits=DirectLimits(hello_timeout_s=0.3, frame_timeout_s=0.3))
    silent = socket.create_connection((s.host, s.port), timeout=5)
    half = socket.create_connection((s.host, s.port), timeout=5)
    half.sendall(pack(hello(TOKEN)) + request_frame(1)[:500])  # a header and part of its body
    assert "no hello" in read_frame(silent)["error"]
    assert "not received within" in read_frame(half)["error"]
    assert read_frame(half) is None
    assert s.server.refused["hello_timeout"] == 1 and s.server.refused["frame_timeout"] == 1
    assert s.server.connections == 0
    silent.close()
    half.close()


def test_connections_over_the_cap_are_refused(make_server) -> None:
    s = make_server(limits=DirectLimits(max_connections=2))
    held = [DirectConnection(s.host, s.port, token=TOKEN) for _ in range(2)]
    for i, conn in enumerate(held):  # both authenticated and served
        conn.submit(make_request("r", "franka", obs(), obs_tick=i))
        assert wait_reply(conn)["request_id"] == f"r:{i}"
    extra = socket.create_connection((s.host, s.port), timeout=5)
    assert "connections open" in read_frame(extra)["error"]
    assert s.server.refused["connections"] == 1
    held[0].close()
    deadline = time.monotonic() + 5
    while s.server.connections > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert robot_is_served(s, 5)


def test_a_request_past_its_deadline_gets_an_error_and_frees_its_slot(make_server) -> None:
    s = make_server(limits=DirectLimits(request_timeout_s=0.2), delay_s=5.0)
    conn = DirectConnection(s.host, s.port, token=TOKEN)
    conn.submit(make_request("r", "franka", obs(), obs_tick=1))
    reply = wait_reply(conn)
    assert reply["request_id"] == "r:1" and "no answer within 0.2 s" in reply["error"]
    deadline = time.monotonic() + 5
    while s.server.in_flight and time.monotonic() < deadline:  # the task ends just after its reply is written
        time.sleep(0.01)
    assert s.server.refused["deadline"] == 1 and s.server.in_flight == 0


def test_the_replica_cap_refuses_a_second_request_but_never_a_robots_first(make_server) -> None:
    s = make_server(limits=DirectLimits(max_in_flight=2), delay_s=0.5)
    socks = []
    for i in range(3):  # three robots, one request each: all admitted although the cap is 2
        sock = socket.create_connection((s.host, s.port), timeout=5)
        sock.sendall(pack(hello(TOKEN)) + request_frame(i))
        socks.append(sock)
    deadline = time.monotonic() + 5
    while s.server.in_flight < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    socks[0].sendall(request_frame(10))  # a second one on a busy replica: refused at once
    reply = read_frame(socks[0])
    assert reply["request_id"] == "flood:10" and "replica busy" in reply["error"]
    assert s.server.refused["in_flight_replica"] == 1
    assert {read_frame(sock)["request_id"] for sock in socks} == {"flood:0", "flood:1", "flood:2"}
    for sock in socks:
        sock.close()
