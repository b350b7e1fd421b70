"""The safety stress-test experiment: documented JSON shape, determinism, plot and table files."""

from __future__ import annotations

import json

import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.experiments.safety import CONSTRAINTS, format_table, run_safety_experiment


@pytest.fixture(scope="module")
def result() -> dict:
    return run_safety_experiment(n=300, seed=3)


def test_returns_the_documented_shape(result):
    assert set(result) == {"n", "embodiments"} and result["n"] == 300
    assert set(result["embodiments"]) == set(EMBODIMENTS)
    for r in result["embodiments"].values():
        assert set(r) == {"modified_share", "by_constraint"}
        assert set(r["by_constraint"]) == {"workspace", "velocity", "force_estop", "non_finite"} == set(CONSTRAINTS)
        for share in [r["modified_share"], *r["by_constraint"].values()]:
            assert isinstance(share, float) and 0.0 <= share <= 1.0
    assert json.loads(json.dumps(result)) == result


def test_shares_reflect_the_injected_faults(result):
    for name, r in result["embodiments"].items():
        bc = r["by_constraint"]
        # ~5% non-finite and ~2% force trips were injected; 1.5x the range overshoots in most requests
        assert 0.01 < bc["non_finite"] < 0.12, name
        assert 0.0 < bc["force_estop"] < 0.07, name
        assert bc["workspace"] > 0.3 and r["modified_share"] >= max(bc.values()), name


def test_deterministic_per_seed(result):
    assert run_safety_experiment(n=300, seed=3) == result
    assert run_safety_experiment(n=300, seed=4) != result


def test_writes_png_and_markdown(tmp_path, result):
    again = run_safety_experiment(n=300, seed=3, out=tmp_path / "safety")
    assert again == result
    png = (tmp_path / "safety" / "safety_clipping.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (tmp_path / "safety" / "safety_table.md").read_text()
    assert table.count("\n| ") == len(EMBODIMENTS) + 1 and "| franka |" in table
    assert sorted(p.name for p in (tmp_path / "safety").iterdir()) == ["safety_clipping.png", "safety_table.md"]


def test_format_table_has_a_row_per_embodiment(result):
    text = format_table(result)
    lines = text.splitlines()
    assert "n=300" in lines[0] and "force_estop" in lines[1] and len(lines) == 3 + len(EMBODIMENTS)
    franka = result["embodiments"]["franka"]
    assert f"{100 * franka['modified_share']:.1f}%" in next(line for line in lines if line.startswith("franka"))


@pytest.mark.parametrize(("kwargs", "match"), [({"n": 0}, "n: expected"), ({"seed": -1}, "seed")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_safety_experiment(**kwargs)
