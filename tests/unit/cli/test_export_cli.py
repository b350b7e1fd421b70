"""`fleet export-corrections`: a corrections log becomes a LeRobot-style dataset readable by pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from fleet.cli import app
from fleet.data.correction import random_correction
from fleet.data.log import CorrectionLog


def test_export_corrections_command(tmp_path):
    log_dir = tmp_path / "corrections"
    rng = np.random.default_rng(0)
    CorrectionLog(log_dir).append([random_correction("franka", rng) for _ in range(3)])
    out = tmp_path / "dataset"
    res = CliRunner().invoke(app, ["export-corrections", str(out), "--log-dir", str(log_dir), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary
    table = pq.read_table(out / "data" / "chunk-000" / "file-000.parquet")
    assert {"index", "episode_index", "frame_index", "action", "observation.state"} <= set(table.column_names)
    assert table.num_rows == 3 * 16
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 3


def test_export_corrections_rejects_missing_log(tmp_path):
    res = CliRunner().invoke(app, ["export-corrections", str(tmp_path / "d"), "--log-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "--log-dir" in res.output
