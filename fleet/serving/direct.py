"""The direct route: robots send act requests straight to a policy replica over one TCP connection.

A Serve handle call costs ~3 ms on this machine (router, Ray task, the replica's request loop), more than
the rest of serving a batch-1 request. Each `PolicyServer` replica therefore also listens on a socket
(`ServeConfig.direct`, loopback by default) and feeds what it receives into the same `@serve.batch` queue
as handle calls: one batch, one forward, whichever way a request came. Robots find the replicas of their
node in the HeadRegistry (`endpoints`), where every replica reports its address.

Wire format, both ways: a 4-byte big-endian length, then a msgpack map. Requests are
`fleet.protocol.request_to_wire(request, binary=True)` (the image travels as 12 288 raw bytes); replies are
`reply_to_msgpackable(reply)`. Replies carry the request's `request_id`; a connection may have several
requests in flight and replies come back in completion order. Nothing is unpickled: a peer can send
garbage and get an error reply, never run code.

No torch and no Ray here: a robot actor imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import msgpack

from fleet.protocol import reply_from_wire, reply_to_msgpackable, request_to_wire

HEADER = struct.Struct("!I")
MAX_FRAME = 4 << 20
SEND_TIMEOUT_S = 1.0
# a robot's send gives up (and the robot falls back to the gateway) if a wedged replica stops reading
# largest frame either side accepts (a request is ~13 kB, a reply with 32 flow samples of leap ~60 kB)


class FrameError(ValueError):
    """A frame that cannot be read: the stream is out of step, so the connection is closed."""


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


# ---- server side (runs on a replica's event loop) -------------------------------------------------
class DirectServer:
    """Accepts connections and answers each frame with `await act(request)`; bad frames get error replies."""

    def __init__(self, act: Callable[[dict], Awaitable[dict]]) -> None:
        self._act = act
        self._server: asyncio.base_events.Server | None = None
        self.host: str | None = None
        self.port: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()  # requests being answered
        self.requests = 0
        self.bad_frames = 0

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_FRAME + HEADER.size)
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tasks = self._tasks
        try:
            while True:
                head = await reader.readexactly(HEADER.size)
                (size,) = HEADER.unpack(head)
                if size > MAX_FRAME:  # out of step or hostile: say why, then hang up
                    self.bad_frames += 1
                    writer.write(pack({"error": f"frame: {size} bytes, at most {MAX_FRAME}"}))
                    await writer.drain()
                    return
                body = await reader.readexactly(size)
                task = asyncio.create_task(self._answer(body, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the robot went away; replies still in flight are dropped
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            request = unpack(body)
        except ValueError as exc:
            self.bad_frames += 1
            reply = {"error": str(exc)}
        else:
            self.requests += 1
            try:
                reply = await self._act(request)  # validation errors come back as {"error": ...} replies
            except Exception as exc:  # noqa: BLE001 - the robot gets an answer, the server keeps serving
                rid = request.get("request_id")
                reply = {"error": f"internal: {type(exc).__name__}: {exc}", "request_id": rid}
        if not writer.is_closing():
            try:
                frame = pack(reply_to_msgpackable(reply))
            except (FrameError, TypeError, ValueError) as exc:
                frame = pack({"error": f"internal: reply not sendable: {exc}", "request_id": reply.get("request_id")})
            writer.write(frame)


# ---- client side (a robot; blocking sockets, polled without blocking the control loop) -------------
class DirectConnection:
    """One robot's connection to one replica: send a request, poll for its reply.

    At most one request is wanted at a time (the PolicyClient contract); the reply to an older, cancelled
    request is read and dropped by its request_id.
    """

    def __init__(self, host: str, port: int, connect_timeout_s: float = 1.0) -> None:
        self.address = (host, int(port))
        self._sock = socket.create_connection(self.address, timeout=connect_timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
