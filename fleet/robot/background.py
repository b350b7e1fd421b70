"""Keep the network off a robot's control thread (numpy-free, no Ray).

A robot commands its body every period, the hold included; a call that can block (a TCP connect, a `sendall`
into a wedged replica's full socket buffer, `ray.get_actor` while the GCS is away, a `ray.wait`) must not run
there. `BackgroundClient` wraps any PolicyClient: `submit`, `poll` and `cancel` only hand the request to a
worker thread and read back what it got, so they return in microseconds whatever the transport does.
`DeferredSink` does the same for correction batches; `IOThread` pumps what sinks need pumped.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class BackgroundClient:
    """PolicyClient whose transport (`inner`, another PolicyClient) runs on its own worker thread.

    One request at a time, like the PolicyLink above it: a new submit or a cancel supersedes the one in flight
    (its reply, if it comes, is dropped). A transport exception reaches the control thread from the next poll."""

    def __init__(self, inner, poll_s: float = 0.002, name: str = "policy-io", rt_priority: int | None = None) -> None:
        """rt_priority: run the worker under SCHED_FIFO too (below the control thread's): a worker holding the
        GIL while the machine's other work starves it would otherwise stall a realtime control thread."""
        self.inner = inner
        self.rt_priority = rt_priority
        self.poll_s = poll_s
        self._cv = threading.Condition()
        self._gen = 0  # generation of the newest request (a cancel also moves it on)
        self._todo: tuple[int, dict] | None = None  # a request waiting for the worker to send it
        self._result: tuple[int, dict | None, BaseException | None] | None = None
        self._closed = False
        self.submits = self.stale_results = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # ---- the control thread's side: never blocks on the transport --------------------------------------
    def submit(self, request: dict) -> None:
        with self._cv:
            self._gen += 1
            self._todo = (self._gen, request)
            self._result = None
            self.submits += 1
            self._cv.notify()

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        with self._cv:
            if self._result is None and timeout_s > 0:
                self._cv.wait_for(lambda: self._result is not None, timeout_s)
            result = self._result
            if result is None or result[0] != self._gen:
                return None
            self._result = None
        _, reply, exc = result
        if exc is not None:
            raise exc
        return reply

    def cancel(self) -> None:
        with self._cv:
            self._gen += 1
            self._todo = None
            self._result = None
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def stats(self) -> dict:
        out = self.inner.stats() if hasattr(self.inner, "stats") else {}
        return out | {"io_thread_alive": self._thread.is_alive()}

    # ---- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        if self.rt_priority:
            from fleet.robot.scheduler import set_realtime_priority

            set_realtime_priority(self.rt_priority)
        active: int | None = None  # generation of the request the inner client has in flight
        while True:
            with self._cv:
                while not self._closed and self._todo is None and active is None:
                    self._cv.wait()
                if self._closed:
                    return
                todo, self._todo = self._todo, None
                gen = self._gen
            if active is not None and (todo is not None or active != gen):
                self._quiet(self.inner.cancel)  # superseded or cancelled
                active = None
            if todo is not None:
                try:
                    self.inner.submit(todo[1])
                    active = todo[0]
                except Exception as exc:  # noqa: BLE001 - reaches the loop through poll
                    self._deliver(todo[0], None, exc)
                continue
            if active is None:
                continue
            try:
                reply = self.inner.poll(self.poll_s)
            except Exception as exc:  # noqa: BLE001
                self._deliver(active, None, exc)
                active = None
                continue
            if reply is not None:
                self._deliver(active, reply, None)
                active = None

    def _deliver(self, gen: int, reply: dict | None, exc: BaseException | None) -> None:
        with self._cv:
            if gen != self._gen:
                self.stale_results += 1
                return
            self._result = (gen, reply, exc)
            self._cv.notify_all()

    @staticmethod
    def _quiet(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - forgetting a request is best effort
            pass


class DeferredSink:
    """A correction sink for the control thread: batches wait in memory (bounded; the oldest go first, counted)
    until the IO thread hands them to the real sink with `drain()`."""

    def __init__(self, sink: Callable[[list], None], limit: int = 5000) -> None:
        self.sink = sink
        self.limit = limit
        self._items: deque = deque()
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, batch: list) -> None:
        with self._lock:
            self._items.extend(batch)
            while len(self._items) > self.limit:
                self._items.popleft()
                self.dropped += 1

    def drain(self) -> int:
        """Hand what waits to the real sink (on the IO thread); kept if it raises."""
        with self._lock:
            batch = list(self._items)
            self._items.clear()
        if not batch:
            return 0
        try:
            self.sink(batch)
        except Exception:
            with self._lock:
                self._items.extendleft(reversed(batch))
            raise
        return len(batch)

    def __len__(self) -> int:
        return len(self._items)


class IOThread:
    """Runs `work()` every `period_s` on a daemon thread until `stop()`; an exception is counted, never fatal."""

    def __init__(self, work: Callable[[], None], period_s: float = 0.02, name: str = "robot-io") -> None:
        self.work, self.period_s = work, period_s
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> IOThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.work()
            except Exception as exc:  # noqa: BLE001
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.period_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()
