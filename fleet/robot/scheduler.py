"""Periodic loops on one thread: a `Scheduler` runs every due loop of one or many robots from a heap of absolute
deadlines, on a wall clock (realtime) or a simulated one (deterministic, as fast as the machine allows).

Why one thread: a robot has four loops (camera 30 Hz, proprio 100 Hz, policy 5-20 Hz, controller up to 1 kHz) and
a machine holds many robots; an OS thread per loop per robot would be 64 threads fighting for the GIL on two
cores. Deadlines are absolute (next = previous deadline + period), so lateness never accumulates into drift; a
loop that falls more than one period behind skips the periods it missed (counted) instead of bursting.

Per loop, `LoopStats` keeps the achieved rate, the start lateness ("jitter": start - deadline), the missed
periods and the tick cost.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

SAMPLES = 8192
# lateness and cost samples kept per loop (the newest) for the percentiles


class WallClock:
    """Realtime: time.perf_counter, sleeping until each deadline."""

    realtime = True

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        d = t - time.perf_counter()
        if d > 0:
            time.sleep(d)


class SimClock:
    """Simulated time: jumps to each deadline at once, so runs are deterministic and as fast as the work."""

    realtime = False

    def __init__(self, start: float = 0.0) -> None:
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        if t > self.t:
            self.t = t


def reduce_timer_slack() -> bool:
    """Ask Linux for 1 us timer slack on this thread (default 50 us), so sleeps end closer to their deadline."""
    try:
        import ctypes

        return ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0) == 0  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        return False


def set_realtime_priority(priority: int) -> bool:
    """Run the calling thread under SCHED_FIFO at `priority` (1-99), as robot controllers do (libfranka asks for
    it), so a busy machine's other work cannot delay a deadline; True if granted (needs CAP_SYS_NICE). The
    kernel's RT throttling (95% of each second by default) still leaves the rest of the machine running."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(priority)))
        return True
    except (OSError, AttributeError, PermissionError):
        return False


class LoopStats:
    """One periodic loop's record."""

    def __init__(self, name: str, hz: float) -> None:
        self.name, self.hz = name, float(hz)
        self.ticks = 0
        self.missed = 0
        self.errors = 0
        self.first: float | None = None
        self.last: float | None = None
        self.late: deque[float] = deque(maxlen=SAMPLES)  # seconds after the deadline a tick started
        self.cost: deque[float] = deque(maxlen=SAMPLES)  # seconds a tick ran (wall clock)

    def summary(self) -> dict:
        span = (self.last - self.first) if self.ticks > 1 and self.last is not None else None
        late = np.asarray(self.late) * 1e3 if self.late else None
        cost = np.asarray(self.cost) * 1e6 if self.cost else None
        periods = self.ticks + self.missed
        return {
            "loop": self.name,
            "target_hz": self.hz,
            "achieved_hz": (self.ticks - 1) / span if span else None,
            "jitter_p50_ms": float(np.percentile(late, 50)) if late is not None else None,
            "jitter_p99_ms": float(np.percentile(late, 99)) if late is not None else None,
            "missed_share": self.missed / periods if periods else 0.0,
            "ticks": self.ticks,
            "missed": self.missed,
            "errors": self.errors,
            "cost_p50_us": float(np.percentile(cost, 50)) if cost is not None else None,
            "cost_p99_us": float(np.percentile(cost, 99)) if cost is not None else None,
        }


class Periodic:
    """One loop: `fn(now)` every `1 / hz` seconds from `start`."""

    __slots__ = ("name", "period", "fn", "stats", "next")

    def __init__(self, name: str, hz: float, fn: Callable[[float], None], start: float) -> None:
        if not hz > 0:
            raise ValueError(f"loop {name!r}: expected a positive rate in Hz, got {hz!r}")
        self.name, self.period, self.fn = name, 1.0 / float(hz), fn
        self.stats = LoopStats(name, hz)
        self.next = start


class Scheduler:
    """Runs periodic loops on the calling thread. `lock` (optional) is held while each tick runs, so other threads
    (an actor's methods) can inspect the robots between ticks."""

    def __init__(self, clock: WallClock | SimClock | None = None, lock: threading.Lock | None = None) -> None:
        self.clock = clock if clock is not None else WallClock()
        self.lock = lock
        self.loops: list[Periodic] = []
        self._heap: list[tuple[float, int, Periodic]] = []
        self._seq = 0

    def every(
        self, name: str, hz: float, fn: Callable[[float], None], phase: float = 0.0, delay: float = 0.0
    ) -> Periodic:
        """Add a loop; its first tick is due `delay` seconds plus `phase` periods (in [0, 1)) from now."""
        loop = Periodic(name, hz, fn, 0.0)
        loop.next = self.clock.now() + delay + phase * loop.period
        self.loops.append(loop)
        self._push(loop)
        return loop

    def _push(self, loop: Periodic) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (loop.next, self._seq, loop))

    def run(self, until: float | None = None, stop: threading.Event | None = None) -> None:
        """Run due loops until the clock passes `until` or `stop` is set. A tick that raises is counted in its
        loop's errors (the loop's own code decides what a failed tick commands; it should not raise)."""
        clock, heap, lock = self.clock, self._heap, self.lock
        now_fn, perf = clock.now, time.perf_counter
        while heap:
            if stop is not None and stop.is_set():
                return
            deadline, _, loop = heap[0]
            if until is not None and deadline > until:
                clock.sleep_until(until)
                return
            clock.sleep_until(deadline)
            start = now_fn()
            heapq.heappop(heap)
            late = start - deadline
            st = loop.stats
            if late >= loop.period:  # fell a whole period behind: skip what was missed, never burst
                skipped = int(late / loop.period)
                st.missed += skipped
                loop.next = deadline + (skipped + 1) * loop.period
            else:
                loop.next = deadline + loop.period
            c0 = perf()
            try:
                if lock is not None:
                    with lock:
                        loop.fn(start)
                else:
                    loop.fn(start)
            except Exception:  # noqa: BLE001 - one loop's fault must not stop the others
                st.errors += 1
            st.cost.append(perf() - c0)
            st.late.append(late if late > 0 else 0.0)
            st.ticks += 1
            if st.first is None:
                st.first = start
            st.last = start
            self._seq += 1
            heapq.heappush(heap, (loop.next, self._seq, loop))
