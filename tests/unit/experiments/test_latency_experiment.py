"""`fleet experiment latency` smoke test: a tiny grid on the shipped checkpoint, the JSON schema, the plots,
and determinism (a cell's figures depend on nothing but its seeds)."""

import json

import pytest

from fleet.experiments.latency import format_table, run_latency_experiment


def test_tiny_grid_writes_the_schema_and_plots_and_repeats_exactly(tmp_path) -> None:
    result = run_latency_experiment(
        ["leap"], delays=(0, 2), replans=(4,), modes=("latest", "rtc"), episodes=2, cost=False, out=tmp_path
    )
    assert len(result["rows"]) == 2 * 2
    for row in result["rows"]:
        assert {"embodiment", "mode", "delay", "replan", "success", "seam_jump", "jerk", "episodes"} <= set(row)
        assert row["episodes"] == 2 and 0 <= row["success"] <= 1 and row["seam_jump"] >= 0 and row["jerk"] >= 0
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert on_disk["rows"] == result["rows"] and "rtc_cost_ratio" in on_disk
    assert (tmp_path / "latency_success.png").stat().st_size > 0 and (tmp_path / "latency_seam.png").exists()
    assert "rtc" in format_table(result)
    again = run_latency_experiment(["leap"], delays=(2,), replans=(4,), modes=("rtc",), episodes=2, cost=False)
    assert again["rows"] == [r for r in result["rows"] if r["delay"] == 2 and r["mode"] == "rtc"]
    with pytest.raises(ValueError, match="--modes"):
        run_latency_experiment(["leap"], modes=("blend",), episodes=1)
