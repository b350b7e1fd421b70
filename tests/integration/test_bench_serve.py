"""`fleet bench serve` smoke test: a tiny budget on a tiny checkpoint returns the documented shape."""

from __future__ import annotations

import pytest

from fleet.embodiments import EMBODIMENTS
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.train import build_model
from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray

KEYS = {"robots", "actions_per_s", "calls_per_s", "p50_ms", "p99_ms", "starved_ticks", "raw_per_s", "raw_ms", "ratio"}


def test_run_serve_bench_smoke(ray_session, tmp_path) -> None:
    from ray import serve

    from fleet.bench.serve import format_table, run_serve_bench, write_plot

    save_checkpoint(build_model(tuple(EMBODIMENTS)[:4], 0, TINY), tmp_path / "policy")
    apps_before = set(serve.status().applications)
    result = run_serve_bench(robot_counts=(1, 2), seconds_per_point=0.5, checkpoint=tmp_path / "policy")
    rows = result["results"]
    assert [r["robots"] for r in rows] == [1, 2]
    for r in rows:
        assert KEYS <= set(r)
        assert r["calls_per_s"] > 0 and r["raw_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["actions_per_s"] == pytest.approx(4 * r["calls_per_s"])
        assert r["ratio"] == pytest.approx(r["calls_per_s"] / r["raw_per_s"])
        assert r["starved_ticks"] >= 0 and r["errors"] == 0
    table = format_table(result)
    assert "ratio" in table and len(table.splitlines()) == 4
    assert write_plot(result, tmp_path / "out").stat().st_size > 0
    assert set(serve.status().applications) == apps_before  # the bench removed its app
