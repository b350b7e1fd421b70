"""ActionBuffer: one action per tick, seams merged per aggregate (exact values), stale dropped, starvation counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.control import AGGREGATES, ActionBuffer, BufferConfig


def ramp(start: float, n: int = 16, d: int = 1) -> np.ndarray:
    """Chunk (n, d) whose action i is start + i in every dimension: easy to recognise after a merge."""
    return np.repeat((start + np.arange(n, dtype=np.float64))[:, None], d, axis=1)


def run(buffer: ActionBuffer, chunks: dict[int, np.ndarray], ticks: range) -> list[np.ndarray | None]:
    """Push each chunk at its obs_tick just before that tick's pop (zero latency)."""
    out = []
    for tick in ticks:
        if tick in chunks:
            buffer.push(chunks[tick], tick)
        out.append(buffer.pop(tick))
    return out


def test_latest_new_chunk_replaces_the_overlap():
    buf = ActionBuffer(16, 4, "latest")
    a, b = ramp(100), ramp(200)
    out = run(buf, {0: a, 4: b}, range(20))
    assert [float(x[0]) for x in out] == [100, 101, 102, 103] + [200 + i for i in range(16)]
    assert buf.stats()["merges"] == 12 and buf.stats()["seams"] == 1


def test_weighted_cross_fades_linearly_over_the_overlap():
    buf = ActionBuffer(16, 4, "weighted")
    a, b = ramp(100), ramp(200)
    out = run(buf, {0: a, 4: b}, range(20))
    for k in range(12):  # ticks 4..15 overlap: weight (k + 1) / 13 on the new chunk
        w = (k + 1) / 13
        assert out[4 + k][0] == pytest.approx((1 - w) * a[4 + k, 0] + w * b[k, 0], abs=1e-12)
    assert [float(x[0]) for x in out[16:]] == [212, 213, 214, 215]  # past the old chunk: new only
    steps = np.diff([float(x[0]) for x in out[3:17]])
    assert np.all(steps > 0) and steps.max() < 100 / 13 + 2  # no jump of 100 at the seam


def test_temporal_ensemble_uses_act_weights_oldest_first():
    m = 0.5
    buf = ActionBuffer(16, 4, "temporal_ensemble", ensemble_m=m)
    chunks = {0: ramp(100), 4: ramp(200), 8: ramp(300)}
    out = run(buf, chunks, range(12))
    assert out[2][0] == 102  # one prediction
    w = [1.0, math.exp(-m)]
    assert out[5][0] == pytest.approx((w[0] * 105 + w[1] * 201) / sum(w), abs=1e-12)
    w = [1.0, math.exp(-m), math.exp(-2 * m)]  # tick 9: predicted by chunks from ticks 0, 4 and 8
    assert out[9][0] == pytest.approx((w[0] * 109 + w[1] * 205 + w[2] * 301) / sum(w), abs=1e-12)


def test_conservative_takes_the_smaller_change_per_dimension():
    buf = ActionBuffer(4, 1, "conservative")
    buf.push(np.array([[1.0, -2.0]]), 0)
    buf.push(np.array([[-0.5, 3.0]]), 0)  # before any pop: the smaller magnitude
    assert np.array_equal(buf.pop(0), [-0.5, -2.0])
    buf = ActionBuffer(4, 1, "conservative")
    buf.push(np.array([[0.5, 0.5, 2.0], [1.0, -1.0, 1.8]]), 0)
    assert np.array_equal(buf.pop(0), [0.5, 0.5, 2.0])
    buf.push(np.array([[0.1, 0.2, 0.1]]), 1)  # now: per dim, closer to the last popped [0.5, 0.5, 2.0]
    assert np.array_equal(buf.pop(1), [0.1, 0.2, 1.8])  # dim 2 keeps 1.8 although 0.1 is smaller


def test_conservative_ties_keep_the_plan():
    buf = ActionBuffer(4, 1, "conservative")
    buf.push(np.array([[1.0]]), 0)
    buf.push(np.array([[-1.0]]), 0)
    assert buf.pop(0)[0] == 1.0


def test_stale_actions_are_dropped_and_counted():
    buf = ActionBuffer(16, 4)
    for tick in range(3):
        assert buf.pop(tick) is None  # starved: nothing yet
    kept = buf.push(ramp(0), 0)  # a late reply for obs_tick 0: ticks 0..2 have passed
    assert kept == 13 and buf.stats()["dropped_stale"] == 3
    assert buf.pop(3)[0] == 3 and buf.last_obs_tick == 0
    assert buf.pop(6)[0] == 6  # ticks 4 and 5 were skipped: dropped, never handed out later
    stats = buf.stats()
    assert stats["dropped_stale"] == 5 and stats["starved_ticks"] == 3 and stats["actions_popped"] == 2


def test_starved_ticks_after_the_chunk_runs_out():
    buf = ActionBuffer(16, 4)
    buf.push(ramp(0, n=4), 0)
    out = [buf.pop(t) for t in range(6)]
    assert [o is None for o in out] == [False] * 4 + [True] * 2
    assert buf.stats()["starved_ticks"] == 2 and len(buf) == 0


def test_needs_refill_protocol():
    buf = ActionBuffer(16, 4, request_timeout=3)
    assert buf.needs_refill(0)  # empty
    buf.mark_requested(0)
    assert not buf.needs_refill(0) and not buf.needs_refill(2)
    assert buf.needs_refill(3)  # the request is presumed lost
    buf.push(ramp(0), 0)
    assert not buf.pending
    assert [buf.needs_refill(t) for t in range(6)] == [False] * 4 + [True] * 2
    buf.mark_requested(4)
    assert not buf.needs_refill(4)
    buf.cancel_request()
    assert buf.needs_refill(4)


def test_needs_refill_when_low():
    buf = ActionBuffer(16, 16, low_water=2)
    buf.push(ramp(0, n=3), 0)
    assert not buf.needs_refill(0) and not buf.needs_refill(1)
    buf.pop(0), buf.pop(1)
    assert buf.needs_refill(2)  # one action left < low_water


def test_out_of_order_reply_is_ignored():
    buf = ActionBuffer(16, 4)
    buf.push(ramp(200), 4)
    assert buf.push(ramp(100), 0) == 0
    assert buf.stats()["dropped_out_of_order"] == 1 and buf.pop(4)[0] == 200


def test_reset_restarts_ticks_and_keeps_counters():
    buf = ActionBuffer(16, 4)
    run(buf, {0: ramp(0)}, range(5))
    buf.reset()
    assert len(buf) == 0 and buf.needs_refill(0) and buf.pop(0) is None
    assert buf.stats()["actions_popped"] == 5 and buf.stats()["starved_ticks"] == 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda b: b.push(np.zeros(7), 0), r"chunk: expected .*shape \(T<=16, D\)"),
        (lambda b: b.push(np.zeros((17, 7)), 0), "T<=16"),
        (lambda b: b.push(np.zeros((4, 7)), -1), "obs_tick"),
        (lambda b: (b.push(np.zeros((4, 7)), 0), b.push(np.zeros((4, 6)), 1)), r"\(T, 7\)"),
        (lambda b: (b.pop(5), b.pop(4)), r"tick: expected >= 6"),
        (lambda b: b.needs_refill(-2), "tick"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(ActionBuffer(16, 4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"recompute_every": 17}, "recompute_every"),
        ({"aggregate": "mean"}, "aggregate"),
        ({"ensemble_m": -1.0}, "ensemble_m"),
        ({"request_timeout": 0}, "request_timeout"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BufferConfig(**kwargs)


@settings(max_examples=150, deadline=None)
@given(
    aggregate=st.sampled_from(AGGREGATES),
    pushes=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 8), st.integers(-50, 50)), min_size=1, max_size=8),
    lag=st.integers(0, 3),
)
def test_every_handed_out_action_lies_within_its_predictions(aggregate, pushes, lag):
    """Whatever the aggregate, a popped value per dimension is within [min, max] of the values predicted for
    that tick by chunks pushed before it; latest gives exactly the newest prediction."""
    buf = ActionBuffer(8, 2, aggregate)
    predictions: dict[int, list[np.ndarray]] = {}
    tick = obs = 0
    rng = np.random.default_rng([AGGREGATES.index(aggregate), lag, len(pushes)])
    for gap, n, offset in pushes:
        obs += gap
        chunk = offset + rng.normal(size=(n, 2))
        while tick < obs + lag:  # the reply arrives `lag` ticks after its observation
            popped = buf.pop(tick)
            if popped is not None:
                preds = np.array(predictions[tick])
                assert np.all(popped >= preds.min(axis=0) - 1e-12) and np.all(popped <= preds.max(axis=0) + 1e-12)
                if aggregate == "latest":
                    assert np.array_equal(popped, preds[-1])
            tick += 1
        if buf.push(chunk, obs):
            for i in range(max(0, tick - obs), n):
                predictions.setdefault(obs + i, []).append(chunk[i])
    stats = buf.stats()
    assert stats["actions_popped"] + stats["starved_ticks"] == tick
