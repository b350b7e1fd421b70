"""The direct route: robots send act requests straight to a policy replica over one TCP connection.

A Serve handle call costs ~3 ms on this machine (router, Ray task, the replica's request loop), more than
the rest of serving a batch-1 request. Each `PolicyServer` replica therefore also listens on a socket
(`ServeConfig.direct`, loopback by default) and feeds what it receives into the same `@serve.batch` queue
as handle calls: one batch, one forward, whichever way a request came. Robots find the replicas of their
node in the HeadRegistry (`endpoints`), where every replica reports its address.

Wire format, both ways: a 4-byte big-endian length, then a msgpack map. The first frame a client sends is
a hello carrying the fleet's token (`fleet_token`: the Ray cluster's token; a cluster without one gets a
per-replica secret that the replica lists with its endpoint in the registry, readable only to processes
on the cluster). Requests are `fleet.protocol.request_to_wire(request, binary=True)` (the image travels
as 12 288 raw bytes); replies are `reply_to_msgpackable(reply)`. Replies carry the request's `request_id`;
a connection may have several requests in flight and replies come back in completion order. Nothing is
unpickled: a peer can send garbage and get an error reply, never run code.

What one peer can make a replica hold is bounded (`DirectLimits`): connections, requests in flight per
connection and per replica, frame sizes, how long a hello or a frame's body may take to arrive, how long
a request may wait for its answer, and the replies waiting to be written (a client that does not read
stops being read). Over-limit work is answered with an error naming the limit and counted (`refused`).

No torch and no Ray here: a robot actor imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack

from fleet.protocol import reply_from_wire, reply_to_msgpackable, request_to_wire
from fleet.validate import check_int, check_number

HEADER = struct.Struct("!I")
MAX_FRAME = 4 << 20
# largest frame a client accepts (a reply with 32 flow samples of leap is ~60 kB)
MAX_HELLO = 4096
# the hello frame: a token and a name, nothing more
HELLO = "fleet-direct/1"
SEND_TIMEOUT_S = 1.0
# a robot's send gives up (and the robot falls back to the gateway) if a wedged replica stops reading
READ_LIMIT = 64 << 10
# asyncio reader buffer per connection: above twice this, the replica stops reading that socket


class FrameError(ValueError):
    """A frame that cannot be read: the stream is out of step, so the connection is closed."""


def fleet_token() -> str | None:
    """The fleet's token as Ray resolves it: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH, or
    ~/.ray/auth_token in token mode; None when this process has none (a cluster without authentication)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip() or None
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not path and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = str(Path.home() / ".ray" / "auth_token")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError:
            return None
    return None


def pack(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame: {len(body)} bytes, at most {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises assorted errors on garbage
        raise ValueError(f"frame: not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"frame: expected a msgpack map, got {type(obj).__name__}")
    return obj


def hello(token: str | None) -> dict:
    """The first frame of a connection."""
    return {"hello": HELLO, "token": token}


@dataclass(frozen=True)
class DirectLimits:
    """What one replica's socket holds at most; `ServeConfig` carries the tunable ones."""

    max_connections: int = 256
    # open connections (authenticated or not); more are told so and closed
    max_in_flight_per_connection: int = 8
    # requests one connection may have unanswered (a robot has one); more are refused
    max_in_flight: int = 128
    # requests the replica holds across connections (Serve's max_ongoing_requests for handle calls); a
    # connection with nothing in flight is still admitted, so a robot is never starved by a flood
    max_request_frame: int = 1 << 20
    # largest request frame (a request is ~13 kB); a larger header closes the connection
    hello_timeout_s: float = 2.0
    # a new connection must authenticate within this
    frame_timeout_s: float = 5.0
    # once a frame's header arrived, its body must follow within this (a half-sent frame is dropped)
    request_timeout_s: float = 5.0
    # a request not answered within this gets an error reply (robots hold their stale actions long before)
    write_buffer_bytes: int = 256 << 10
    # replies queued for a client that does not read; above it the connection is not read until they drain

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_in_flight_per_connection", "max_in_flight", "write_buffer_bytes"):
            check_int(f"DirectLimits.{name}", getattr(self, name), lo=1, expected="a positive int")
        check_int("DirectLimits.max_request_frame", self.max_request_frame, 64, MAX_FRAME)
        for name in ("hello_timeout_s", "frame_timeout_s", "request_timeout_s"):
            check_number(f"DirectLimits.{name}", getattr(self, name), 0.01, 600, expected="seconds in [0.01, 600]")


# ---- server side (runs on a replica's event loop) -------------------------------------------------
class DirectServer:
    """Accepts authenticated connections and answers each frame with `await act(request)`, within
    `limits`; bad frames get error replies, over-limit work a refusal (counted in `refused` by limit)."""

    def __init__(self, act: Callable[[dict], Awaitable[dict]], token: str, limits: DirectLimits | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise ValueError("DirectServer.token: expected a non-empty string (fleet_token() or a secret)")
        self._act = act
        self._token = token.encode()
        self.limits = limits or DirectLimits()
        self._server: asyncio.base_events.Server | None = None
        self.host: str | None = None
        self.port: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()  # requests being answered
        self.requests = 0
        self.bad_frames = 0
        self.refused: Counter[str] = Counter()
        # by limit: connections, auth, hello_timeout, frame_timeout, frame_size, in_flight_connection,
        # in_flight_replica, deadline

    @property
    def connections(self) -> int:
        return len(self._writers)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "bad_frames": self.bad_frames,
            "connections": self.connections,
            "in_flight": self.in_flight,
            "refused": dict(self.refused),
            "refused_total": sum(self.refused.values()),
        }

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._connection, host, port, limit=READ_LIMIT)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.host, self.port

    async def close(self) -> None:
        """Stop listening and hang up on every robot (they fall back to the gateway)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        writers = list(self._writers)
        self._writers.clear()
        for writer in writers:
            writer.close()
        if writers:  # let the transports actually close before the caller stops the loop
            closing = asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closing, 1.0)

    async def _refuse(self, writer: asyncio.StreamWriter, limit: str, message: str) -> None:
        """Say why, then hang up (the limits that end a connection)."""
        self.refused[limit] += 1
        with contextlib.suppress(Exception):
            writer.write(pack({"error": message}))
            await asyncio.wait_for(writer.drain(), 0.5)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        if len(self._writers) >= lim.max_connections:
            await self._refuse(writer, "connections", f"direct: {lim.max_connections} connections open, at most that")
            writer.close()
            return
        self._writers.add(writer)
        writer.transport.set_write_buffer_limits(high=lim.write_buffer_bytes)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mine: set[asyncio.Task] = set()  # this connection's requests in flight
        try:
            if not await self._authenticate(reader, writer):
                return
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > lim.max_request_frame:  # out of step or hostile: say why, then hang up
                    self.bad_frames += 1
                    await self._refuse(writer, "frame_size", f"frame: {size} bytes, at most {lim.max_request_frame}")
                    return
                try:
                    body = await asyncio.wait_for(reader.readexactly(size), lim.frame_timeout_s)
                except TimeoutError:
                    await self._refuse(
                        writer, "frame_timeout", f"frame: body not received within {lim.frame_timeout_s} s"
                    )
                    return
                self._admit(body, writer, mine)
                # a client that does not read its replies stops being read: they can never pile up here
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the robot went away; replies still in flight are dropped
        finally:
            for task in mine:
                task.cancel()
            self._writers.discard(writer)
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """The hello frame, within hello_timeout_s, carrying the fleet's token."""
        lim = self.limits
        try:
            async with asyncio.timeout(lim.hello_timeout_s):
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if size > MAX_HELLO:
                    await self._refuse(writer, "auth", f"direct: expected a hello frame of <= {MAX_HELLO} bytes first")
                    return False
                body = await reader.readexactly(size)
        except TimeoutError:
            await self._refuse(writer, "hello_timeout", f"direct: no hello within {lim.hello_timeout_s} s")
            return False
        try:
            frame = unpack(body)
        except ValueError:
            frame = {}
        token = frame.get("token")
        if frame.get("hello") != HELLO or not isinstance(token, str):
            await self._refuse(writer, "auth", f"direct: expected a hello frame {{'hello': {HELLO!r}, 'token'}} first")
            return False
        if not hmac.compare_digest(token.encode(), self._token):
            await self._refuse(writer, "auth", "direct: authentication failed: wrong token")
            return False
        return True

    def _admit(self, body: bytes, writer: asyncio.StreamWriter, mine: set[asyncio.Task]) -> None:
        """Answer the frame in a task, or refuse it at once when a limit is reached."""
        lim = self.limits
        limit = None
        if len(mine) >= lim.max_in_flight_per_connection:
            limit = "in_flight_connection"
            cap = lim.max_in_flight_per_connection
            why = f"direct: {len(mine)} requests in flight on this connection, at most {cap}"
        elif mine and len(self._tasks) >= lim.max_in_flight:
            limit = "in_flight_replica"
            why = f"direct: replica busy, {len(self._tasks)} requests in flight, at most {lim.max_in_flight}"
        if limit is not None:
            self.refused[limit] += 1
            try:
                rid = unpack(body).get("request_id")
            except ValueError:
                rid = None
            self._write(writer, {"error": why, "request_id": rid if isinstance(rid, str) else None})
            return
        task = asyncio.create_task(self._answer(body, writer))
        for tasks in (self._tasks, mine):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _answer(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            request = unpack(body)
        except ValueError as exc:
            self.bad_frames += 1
            reply = {"error": str(exc)}
        else:
            self.requests += 1
            rid = request.get("request_id")
            try:
                # validation errors come back as {"error": ...} replies
                reply = await asyncio.wait_for(self._act(request), self.limits.request_timeout_s)
            except TimeoutError:
                self.refused["deadline"] += 1
                reply = {"error": f"direct: no answer within {self.limits.request_timeout_s} s", "request_id": rid}
            except Exception as exc:  # noqa: BLE001 - the robot gets an answer, the server keeps serving
                reply = {"error": f"internal: {type(exc).__name__}: {exc}", "request_id": rid}
        self._write(writer, reply)

    def _write(self, writer: asyncio.StreamWriter, reply: dict) -> None:
        if writer.is_closing():
            return
        try:
            frame = pack(reply_to_msgpackable(reply))
        except (FrameError, TypeError, ValueError) as exc:
            frame = pack({"error": f"internal: reply not sendable: {exc}", "request_id": reply.get("request_id")})
        writer.write(frame)


# ---- client side (a robot; blocking sockets, polled without blocking the control loop) -------------
class DirectConnection:
    """One robot's connection to one replica: send a request, poll for its reply.

    At most one request is wanted at a time (the PolicyClient contract); the reply to an older, cancelled
    request is read and dropped by its request_id. `token` None sends `fleet_token()`.
    """

    def __init__(self, host: str, port: int, connect_timeout_s: float = 1.0, token: str | None = None) -> None:
        """Connect and authenticate with `token` (None: `fleet_token()`, the fleet's Ray token); a wrong token
        is answered with an error reply and a closed connection, which the first poll reports."""
        self.address = (host, int(port))
        self._sock = socket.create_connection(self.address, timeout=connect_timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(pack(hello(token if token is not None else fleet_token())))  # a few bytes: never blocks
        self._sock.setblocking(False)
        self._buf = bytearray()
        self._want: str | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def submit(self, request: dict) -> None:
        frame = pack(request_to_wire(request, binary=True))
        self._want = str(request.get("request_id"))
        self._sock.settimeout(SEND_TIMEOUT_S)  # a 13 kB frame fits the socket buffer: this returns at once
        try:
            self._sock.sendall(frame)
        finally:
            self._sock.setblocking(False)

    def cancel(self) -> None:
        self._want = None

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        """The reply to the last submitted request, or None while it is in flight. Raises ConnectionError
        when the replica closed the connection."""
        if self._want is None:
            return None
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            reply = self._next_frame()
            if reply is not None:
                if reply.get("request_id") is not None and str(reply.get("request_id")) != self._want:
                    continue  # the answer to a cancelled request
                self._want = None
                return reply_from_wire(reply)
            ready, _, _ = select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError(f"policy replica {self.address} closed the connection")
            self._buf += data

    def _next_frame(self) -> dict | None:
        if len(self._buf) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buf)
        if size > MAX_FRAME:
            raise ConnectionError(f"policy replica {self.address}: frame of {size} bytes, out of step")
        if len(self._buf) < HEADER.size + size:
            return None
        body = bytes(self._buf[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        return unpack(body)
