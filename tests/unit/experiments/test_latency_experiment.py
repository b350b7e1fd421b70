"""`fleet experiment latency` smoke test: a tiny grid on the shipped checkpoint, the JSON schema, the plots,
and determinism (a cell's figures depend on nothing but its seeds)."""

import json

import pytest
import torch

from fleet.experiments.latency import format_table, run_cell, run_latency_experiment

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_tiny_grid_writes_the_schema_and_plots(tmp_path) -> None:
    result = run_latency_experiment(
        ["leap", "hello"], delays=(0, 2), replans=(4,), modes=("latest", "rtc"), episodes=2, cost=False, out=tmp_path
    )
    assert len(result["rows"]) == 2 * 2 * 2
    for row in result["rows"]:
        assert {"embodiment", "mode", "delay", "replan", "success", "seam_jump", "jerk", "episodes"} <= set(row)
        assert row["episodes"] == 2 and 0 <= row["success"] <= 1 and row["seam_jump"] >= 0 and row["jerk"] >= 0
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert on_disk["rows"] == result["rows"] and "rtc_cost_ratio" in on_disk
    assert (tmp_path / "latency_success.png").stat().st_size > 0 and (tmp_path / "latency_seam.png").exists()
    assert "rtc" in format_table(result)


def test_a_cell_is_deterministic_and_bad_modes_are_refused() -> None:
    from fleet.policy.default import load_policy

    torch.set_num_threads(1)
    model, _ = load_policy()
    a = run_cell(model, "leap", "rtc", 1, 2, 3, seed=0, n_envs=3)
    b = run_cell(model, "leap", "rtc", 1, 2, 3, seed=0, n_envs=3)
    assert a == b
    with pytest.raises(ValueError, match="--modes"):
        run_latency_experiment(["leap"], modes=("blend",), episodes=1)
