"""ActionBuffer `align`: where a chunk that arrives late starts (time: at its observation tick, skipping the passed
ticks; arrival: with its first action at the first tick still to serve). Ages count from the observation either way."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.control import ALIGNS, ActionBuffer, BufferConfig


def ramp(start: float, n: int = 16) -> np.ndarray:
    """Chunk (n, 1) whose action i is start + i."""
    return (start + np.arange(n, dtype=np.float64))[:, None]


def delayed(align: str, delay: int, ticks: int = 14, replan: int = 4, aggregate: str = "latest") -> list:
    """A robot that asks every `replan` ticks and gets each reply `delay` ticks later (pushed before that tick's
    pop, as the robot loop does). Chunk k is ramp(100 k). Returns per tick (action or None, last_obs_tick)."""
    buf = ActionBuffer(16, replan, aggregate, align=align)
    pending: list[tuple[int, int]] = []  # (arrival tick, obs tick)
    out, k = [], 0
    for tick in range(ticks):
        for due, obs in [p for p in pending if p[0] <= tick]:
            buf.push(ramp(100 * (obs // replan + 1)), obs)
            pending.remove((due, obs))
        if not pending and buf.needs_refill(tick):
            buf.mark_requested(tick)
            if delay == 0:
                buf.push(ramp(100 * (tick // replan + 1)), tick)
            else:
                pending.append((tick + delay, tick))
            k += 1
        a = buf.pop(tick)
        out.append((None if a is None else float(a[0]), buf.last_obs_tick))
    return out


def test_the_two_alignments_are_identical_without_delay() -> None:
    for aggregate in ("latest", "weighted", "temporal_ensemble", "conservative"):
        assert delayed("time", 0, aggregate=aggregate) == delayed("arrival", 0, aggregate=aggregate)


def test_time_skips_the_actions_for_passed_ticks_and_arrival_starts_with_the_first() -> None:
    # requests at ticks 0, 4, 8, 12 (observation ticks); replies 2 ticks later
    time = [a for a, _ in delayed("time", 2)]
    arrival = [a for a, _ in delayed("arrival", 2)]
    # nothing before the first reply in either
    assert time[:2] == arrival[:2] == [None, None]
    # time: chunk 1 (obs 0) from its action 2 at tick 2; chunk 2 (obs 4) from its action 2 at tick 6, ...
    assert time[2:14] == [102, 103, 104, 105, 202, 203, 204, 205, 302, 303, 304, 305]
    # arrival: every chunk from its action 0, two ticks behind: chunk 1 at tick 2, chunk 2 at tick 6, ...
    assert arrival[2:14] == [100, 101, 102, 103, 200, 201, 202, 203, 300, 301, 302, 303]


def test_ages_count_from_the_observation_in_both() -> None:
    for align in ALIGNS:
        obs_ticks = [o for _, o in delayed(align, 3)]
        # ticks 3-6 run the chunk observed at tick 0, ticks 7-10 the one observed at 4
        assert obs_ticks[3:11] == [0, 0, 0, 0, 4, 4, 4, 4]


def test_arrival_keeps_the_refill_cadence_and_counts_no_stale_drops() -> None:
    buf = ActionBuffer(16, 4, "latest", align="arrival")
    buf.push(ramp(0), 0)
    for t in range(3):
        buf.pop(t)
    assert not buf.needs_refill(3) and buf.needs_refill(4)  # every recompute_every ticks after the observation
    buf.pop(3)
    buf.pop(4)
    kept = buf.push(ramp(500), 3)  # observed at tick 3, arrives before tick 5: two ticks late
    assert kept == 16 and buf.stats()["dropped_stale"] == 0
    assert float(buf.pop(5)[0]) == 500 and buf.last_obs_tick == 3
    assert buf.measured_delay == 2  # latencies are measured as before


def test_a_late_chunk_longer_than_the_rest_of_the_plan_still_lands_whole() -> None:
    buf = ActionBuffer(16, 4, "latest", align="arrival")
    for t in range(10):
        assert buf.pop(t) is None
    assert buf.push(ramp(0), 0) == 16  # ten ticks late: time alignment would keep 6
    assert [float(buf.pop(t)[0]) for t in range(10, 26)] == list(range(16))
    assert buf.pop(26) is None
    late = ActionBuffer(16, 4, "latest")
    for t in range(10):
        late.pop(t)
    assert late.push(ramp(0), 0) == 6


def test_bad_alignments_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="BufferConfig.align"):
        BufferConfig(align="skip")
    with pytest.raises(ValueError, match="BufferConfig.align: expected 'time' with aggregate='rtc'"):
        ActionBuffer(16, 4, "rtc", align="arrival")
    assert BufferConfig().align == "time"
