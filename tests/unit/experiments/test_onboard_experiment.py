"""`fleet experiment onboard`: argument errors, and a smoke run at a tiny budget (slow)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.experiments.onboard import format_table, run_onboard_experiment


@pytest.mark.parametrize("demos", ["10,5", "0,10", "x", ""])
def test_bad_demo_counts_are_refused(demos):
    result = CliRunner().invoke(app, ["experiment", "onboard", "--demos", demos])
    assert result.exit_code == 2 and "--demos" in result.output


def test_embodiment_spec_prints_a_spec_file_add_accepts(tmp_path):
    from fleet.learning.onboard_spec import load_spec_file

    result = CliRunner().invoke(app, ["embodiment", "spec", "so100"])
    assert result.exit_code == 0, result.output
    (tmp_path / "so100.json").write_text(result.output)
    plan = load_spec_file(tmp_path / "so100.json")
    assert plan.spec.name == "so100" and plan.like == "franka"
    assert CliRunner().invoke(app, ["embodiment", "spec", "franka"]).exit_code == 2


def test_a_body_the_checkpoint_has_is_refused():
    with pytest.raises(ValueError, match="already a body"):
        run_onboard_experiment("franka", demos=(1,))


@pytest.mark.slow
def test_smoke_run_writes_table_json_and_plot(tmp_path):
    result = run_onboard_experiment(demos=(1, 2), episodes=1, steps=2, batch_size=4, out=tmp_path, log=lambda m: None)
    assert [r["demos"] for r in result["rows"]] == [1, 2]
    assert result["other_heads_identical"] is True
    row = result["rows"][0]
    assert set(row) >= {"demos", "success_shared", "success_scratch", "train_s"}
    assert row["steps_shared"] == 2 and row["steps_scratch"] >= 1
    assert json.loads((tmp_path / "onboard.json").read_text())["embodiment"] == "so100"
    assert (tmp_path / "onboard.png").read_bytes()[:4] == b"\x89PNG"
    assert "bit-identical: True" in format_table(result)
