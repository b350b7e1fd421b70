"""`fleet render --out DIR`: one PNG strip per embodiment plus all.png; and the gallery helpers behind it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.sim import env_names
from fleet.sim.gallery import expert_frames, render_gallery
from tests.mocks.sim_helpers import NAMES, PNG_SIGNATURE, png_info

# every simulator, the bodies not yet added to the fleet (so100) included
EXPECTED_FILES = {f"{n}.png" for n in env_names()} | {"all.png"}
assert set(NAMES) <= set(env_names())
REPO = Path(__file__).resolve().parents[3]


def _assert_pngs(out: Path) -> None:
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    for name in EXPECTED_FILES:
        data = (out / name).read_bytes()
        assert len(data) > 1000, f"{name} is only {len(data)} bytes"
        assert data.startswith(PNG_SIGNATURE), f"{name} lacks the PNG signature"
        width, height = png_info(data)
        assert width > 64 and height > 64, (name, width, height)


def test_render_command_writes_one_png_per_embodiment(tmp_path):
    out = tmp_path / "gallery"  # does not exist yet: the command creates it
    result = CliRunner().invoke(app, ["render", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _assert_pngs(out)
    printed = {Path(line).name for line in result.stdout.split()}
    assert printed == EXPECTED_FILES


def test_render_command_with_seed_and_shift(tmp_path):
    result = CliRunner().invoke(
        app, ["render", "--out", str(tmp_path), "--seed", "3", "--shift", "lighting+distractors"]
    )
    assert result.exit_code == 0, result.output
    _assert_pngs(tmp_path)


def test_render_command_bad_shift_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(app, ["render", "--out", str(tmp_path / "x"), "--shift", "gravity"])
    assert result.exit_code == 2
    assert "gravity" in result.stderr and "error" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("*.png"))


def test_help_lists_render():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "render" in result.stdout


def test_python_m_fleet_cli_render(tmp_path):
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "render", "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _assert_pngs(tmp_path)
    assert len(proc.stdout.split()) == len(EXPECTED_FILES)


@pytest.mark.parametrize("name", NAMES)
def test_expert_frames(name):
    frames, instruction, ok = expert_frames(name, seed=0, n_frames=5)
    assert ok, f"{name}: the gallery's expert episode failed"
    assert len(frames) == 5 and instruction
    for f in frames:
        assert f.shape == (64, 64, 3) and f.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1]), "the robot did not visibly move"


def test_render_gallery_subset(tmp_path):
    paths = render_gallery(tmp_path, names=["leap"], seed=1)
    assert [p.name for p in paths] == ["leap.png", "all.png"]
    for p in paths:
        png_info(p.read_bytes())
