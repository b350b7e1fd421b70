"""`fleet experiment latency` smoke test: a tiny grid on the shipped checkpoint, the JSON schema, the plots,
and determinism (a cell's figures depend on nothing but its seeds)."""

import json

import pytest

from fleet.experiments.latency import format_table, run_latency_experiment


def test_tiny_grid_writes_the_schema_and_plots_and_repeats_exactly(tmp_path) -> None:
    result = run_latency_experiment(
        ["leap"],
        delays=(0, 2),
        replans=(4,),
        modes=("latest", "rtc"),
        aligns=("time", "arrival"),
        episodes=2,
        cost=False,
        out=tmp_path,
    )
    assert len(result["rows"]) == 2 * 3  # rtc runs time-aligned only
    for row in result["rows"]:
        assert {"embodiment", "mode", "align", "delay", "replan", "success", "seam_jump", "jerk", "episodes"} <= set(
            row
        )
        assert row["episodes"] == 2 and 0 <= row["success"] <= 1 and row["seam_jump"] >= 0 and row["jerk"] >= 0
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert on_disk["rows"] == result["rows"] and "rtc_cost_ratio" in on_disk
    assert (tmp_path / "latency_success.png").stat().st_size > 0 and (tmp_path / "latency_seam.png").exists()
    assert "rtc" in format_table(result) and "latest@arrival" in format_table(result)
    cell = {(r["mode"], r["align"], r["delay"]): r for r in result["rows"]}
    # without delay the alignments cannot differ
    assert {**cell["latest", "arrival", 0], "align": "time"} == cell["latest", "time", 0]
    assert ("rtc", "arrival", 0) not in cell
    again = run_latency_experiment(["leap"], delays=(2,), replans=(4,), modes=("rtc",), episodes=2, cost=False)
    assert again["rows"] == [r for r in result["rows"] if r["delay"] == 2 and r["mode"] == "rtc"]
    with pytest.raises(ValueError, match="--align"):
        run_latency_experiment(["leap"], aligns=("late",), episodes=1)
    with pytest.raises(ValueError, match="--modes"):
        run_latency_experiment(["leap"], modes=("blend",), episodes=1)


def test_the_expert_plans_every_chunk_without_a_checkpoint() -> None:
    """--policy expert: the sim's expert look-ahead is the policy (its rtc continues the committed prefix); with
    no delay its chunks finish every episode, and no checkpoint is timed."""
    result = run_latency_experiment(
        ["franka"], delays=(0, 2), replans=(4,), modes=("latest", "rtc"), episodes=3, cost=True, policy="expert"
    )
    assert result["policy"] == "expert" and result["rtc_cost_ratio"] == {}
    cell = {(r["mode"], r["delay"]): r for r in result["rows"]}
    assert cell["latest", 0]["success"] == cell["rtc", 0]["success"] == 1.0
    assert cell["rtc", 2]["seam_jump"] != cell["latest", 2]["seam_jump"]  # the prefix reached the expert
    with pytest.raises(ValueError, match="--policy"):
        run_latency_experiment(["leap"], policy="oracle", episodes=1)
