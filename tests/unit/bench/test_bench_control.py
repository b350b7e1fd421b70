"""`fleet bench control` smoke test: one realtime robot for half a second, in this process, at normal priority.
Checks the result's shape and that nothing unsafe happened, never how fast it ran."""

from __future__ import annotations

from fleet.bench.control import format_table, run_control_bench


def test_bench_control_smoke():
    result = run_control_bench(robots=1, seconds=0.5, procs=1, rt_priority=None)
    assert [r["loop"] for r in result["results"]] == ["camera", "proprio", "policy", "controller"]
    for r in result["results"]:
        assert {"robots", "loop", "target_hz", "achieved_hz", "jitter_p50_ms", "jitter_p99_ms", "missed_share"} <= set(
            r
        )
        assert r["robots"] == 1 and 0.0 <= r["missed_share"] <= 1.0
    assert set(result["frame_to_command_ms"]) == {"p50", "p99"}
    assert result["violations"] == 0 and result["estop_trips"] == 0 and result["commands"] > 0
    assert result["controller_tick_us"]["p50"] > 0
    assert all(len(line) <= 80 for line in format_table(result).splitlines())
