"""`fleet bench control --server`: the shipped policy served on the same cores as the robots being measured.

The server is a subprocess (`python -m fleet.bench.control_server`) running `PolicyRuntime.act_batch` (real
batched inference, torch) on whatever requests have arrived, over its stdin/stdout pipes in the direct socket's
frame format (4-byte length + msgpack, arrays as raw bytes; nothing is unpickled). `PipeServer` starts it
in the robots' process and hands out one `PipeClient` (a PolicyClient) per robot; the robots reach them through
`BackgroundClient`, as a fleet robot reaches its replica, so a slow server makes them hold, never block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from fleet.protocol import reply_from_wire, reply_to_msgpackable, request_to_wire
from fleet.serving.direct import HEADER, MAX_FRAME, pack, unpack

MAX_BATCH = 64


def _read_frame(stream) -> dict | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame: {size} bytes, at most {MAX_FRAME}")
    body = stream.read(size)
    if len(body) < size:
        return None
    return unpack(body)


def _normal_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


class PipeClient:
    """One robot's PolicyClient over the shared pipe server."""

    def __init__(self, server: PipeServer, robot: int) -> None:
        self.server, self.robot = server, robot
        self._want: str | None = None

    def submit(self, request: dict) -> None:
        self._want = str(request["request_id"])
        self.server.send(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._want is None:
            return None
        reply = self.server.take(self._want, timeout_s)
        if reply is not None:
            self._want = None
        return reply

    def cancel(self) -> None:
        if self._want is not None:
            self.server.forget(self._want)
        self._want = None


class PipeServer:
    """The policy server subprocess and the replies it sent, by request id."""

    def __init__(self, threads: int = 2, rt_priority: int | None = None) -> None:
        self.rt_priority = rt_priority
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.bench.control_server", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=_normal_priority,  # never inherit a realtime control thread's SCHED_FIFO
        )
        self._write = threading.Lock()
        self._cv = threading.Condition()
        self._replies: dict[str, dict] = {}
        self._ready = threading.Event()
        self.sent = self.received = self.dropped = 0
        self._clients = 0
        self._reader = threading.Thread(target=self._read, name="policy-pipe", daemon=True)
        self._reader.start()

    def client(self) -> PipeClient:
        self._clients += 1
        return PipeClient(self, self._clients)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        if not self._ready.wait(timeout_s):
            raise RuntimeError("the policy server subprocess did not start")

    def send(self, request: dict) -> None:
        frame = pack(request_to_wire(request, binary=True))
        with self._write:
            self.proc.stdin.write(frame)
            self.proc.stdin.flush()
        self.sent += 1

    def take(self, request_id: str, timeout_s: float) -> dict | None:
        with self._cv:
            if request_id not in self._replies and timeout_s > 0:
                self._cv.wait_for(lambda: request_id in self._replies, timeout_s)
            reply = self._replies.pop(request_id, None)
        return None if reply is None else reply_from_wire(reply)

    def forget(self, request_id: str) -> None:
        with self._cv:
            self._replies.pop(request_id, None)

    def _read(self) -> None:
        if self.rt_priority:  # it takes the GIL for every reply: keep it from being starved while holding it
            from fleet.robot.scheduler import set_realtime_priority

            set_realtime_priority(self.rt_priority)
        while True:
            try:
                frame = _read_frame(self.proc.stdout)
            except ValueError:
                return
            if frame is None:
                return
            if frame.get("ready"):
                self._ready.set()
                continue
            with self._cv:
                self.received += 1
                self._replies[str(frame.get("request_id"))] = frame
                while len(self._replies) > 4096:  # replies nobody collects (cancelled requests)
                    self._replies.pop(next(iter(self._replies)))
                    self.dropped += 1
                self._cv.notify_all()

    def close(self) -> dict:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return {"requests": self.sent, "replies": self.received}


def serve(threads: int) -> None:
    """The subprocess: read requests, answer each batch of what has arrived with one act_batch."""
    from fleet.serving.runtime import PolicyRuntime

    runtime = PolicyRuntime(threads=threads, max_batch=MAX_BATCH)
    inbox: list[dict] = []
    cv = threading.Condition()
    done = threading.Event()

    def reader() -> None:
        while True:
            frame = _read_frame(sys.stdin.buffer)
            if frame is None:
                done.set()
                with cv:
                    cv.notify()
                return
            with cv:
                inbox.append(frame)
                cv.notify()

    threading.Thread(target=reader, daemon=True).start()
    out = sys.stdout.buffer
    out.write(pack({"ready": True}))
    out.flush()
    while True:
        with cv:
            cv.wait_for(lambda: inbox or done.is_set())
            if not inbox and done.is_set():
                return
            batch, inbox[:] = inbox[:MAX_BATCH], inbox[MAX_BATCH:]
        t0 = time.perf_counter()
        replies = runtime.act_batch(batch)
        for reply in replies:
            reply.setdefault("server_timing", {})["pipe_batch_ms"] = (time.perf_counter() - t0) * 1e3
            out.write(pack(reply_to_msgpackable(reply)))
        out.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
