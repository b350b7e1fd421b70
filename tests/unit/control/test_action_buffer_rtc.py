"""ActionBuffer's rtc mode: the plan handed to the next request, the measured committed delay, no blending."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.control import ActionBuffer, BufferConfig
from fleet.protocol import make_request, validate_request


def ramp(start: float, n: int = 16, d: int = 2) -> np.ndarray:
    return np.repeat((start + np.arange(n, dtype=np.float64))[:, None], d, axis=1)


def test_request_prefix_is_the_remaining_plan_and_the_seam_does_not_blend():
    buf = ActionBuffer(16, 4, "rtc", rtc_soft=16)  # the whole remaining plan
    assert buf.request_prefix(0) is None  # nothing planned yet
    buf.push(ramp(100), 0)
    for t in range(4):
        buf.pop(t)
    rtc = buf.request_prefix(4)
    assert rtc["prefix"].dtype == np.float32 and rtc["prefix"].shape == (12, 2)
    assert rtc["prefix"][:, 0].tolist() == [104 + i for i in range(12)]
    assert rtc["prefix_delay"] == 0  # the first chunk arrived at once
    buf.push(ramp(200), 4)  # the policy's continuation replaces the plan from the seam, unblended
    assert [float(buf.pop(t)[0]) for t in range(4, 8)] == [200, 201, 202, 203]
    assert buf.stats()["seams"] == 1


def test_measured_delay_is_the_largest_recent_latency():
    buf = ActionBuffer(16, 4, "rtc", latency_window=2, rtc_soft=16)
    buf.push(ramp(0), 0)  # latency 0
    for t in range(6):
        buf.pop(t)
    buf.push(ramp(10), 3)  # observed at 3, arrived before tick 6 popped: latency 3
    assert buf.measured_delay == 3
    rtc = buf.request_prefix(6)
    assert rtc["prefix_delay"] == 3 and rtc["prefix"][0, 0] == 13  # obs_tick 3 + 3 ticks in
    for t in range(6, 8):
        buf.pop(t)
    buf.push(ramp(20), 7)  # latency 1
    buf.push(ramp(30), 8)  # latency 0 (8 > next tick): the window of 2 forgets the 3
    assert buf.measured_delay == 1
    assert ActionBuffer(16, 4, "rtc", rtc_delay=2).measured_delay == 2


def test_prefix_is_capped_by_what_is_planned_and_other_modes_send_none():
    buf = ActionBuffer(16, 4, "rtc", rtc_delay=5, rtc_soft=16)
    buf.push(ramp(0, n=3), 0)
    rtc = buf.request_prefix(0)
    assert rtc["prefix"].shape == (3, 2) and rtc["prefix_delay"] == 3  # d <= n
    latest = ActionBuffer(16, 4, "latest")
    latest.push(ramp(0), 0)
    assert latest.request_prefix(0) is None
    assert np.array_equal(latest.peek(2), ramp(0)[2]) and latest.peek(40) is None


def test_request_prefix_feeds_a_valid_request():
    buf = ActionBuffer(16, 4, "rtc", rtc_delay=2)
    buf.push(np.full((16, 7), 0.01), 0)
    obs = {"image": np.zeros((64, 64, 3), np.uint8), "proprio": np.zeros(8, np.float32), "instruction": "pick"}
    req = validate_request(make_request("r", "franka", obs, obs_tick=0, **buf.request_prefix(0)))
    assert req["prefix"].shape == (6, 7) and req["prefix_delay"] == 2  # committed 2 + the execution horizon 4


@pytest.mark.parametrize("field, value", [("rtc_delay", -1), ("rtc_delay", 17), ("latency_window", 0)])
def test_rtc_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        BufferConfig(aggregate="rtc", **{field: value})


def test_rtc_soft_limits_what_the_request_sends():
    buf = ActionBuffer(16, 4, "rtc", rtc_delay=2, rtc_soft=3)
    buf.push(ramp(0), 0)
    rtc = buf.request_prefix(0)
    assert rtc["prefix"].shape == (5, 2) and rtc["prefix_delay"] == 2
    none = ActionBuffer(16, 4, "rtc", rtc_soft=0)  # nothing committed, nothing soft: a plain request
    none.push(ramp(0), 0)
    assert none.request_prefix(0) is None


def test_request_prefix_sends_what_executes_when_told():
    """`executes` maps the plan to what the robot will really send (SafetyLayer.preview); the prefix is that,
    the buffer's own plan is unchanged, and a mapping that changes the shape is refused."""
    buf = ActionBuffer(16, 4, "rtc", rtc_delay=2)
    buf.push(ramp(0), 0)
    rtc = buf.request_prefix(0, executes=lambda plan: plan * 0.5)
    assert rtc["prefix"][:, 0].tolist() == [0.5 * i for i in range(6)] and rtc["prefix_delay"] == 2
    assert float(buf.peek(3)[0]) == 3.0
    with pytest.raises(ValueError, match="executes: expected"):
        buf.request_prefix(0, executes=lambda plan: plan[:2])
