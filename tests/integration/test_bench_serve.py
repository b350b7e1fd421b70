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


@pytest.mark.slow  # ~28 s on a loaded 2-core machine (a peer process loads torch): outside the default budget
def test_openpi_bench_smoke(ray_session, tmp_path) -> None:
    """`fleet bench serve --route openpi,peer` on a tiny budget: both servers answer the same client process in
    alternating windows, and the replica batched what came over its openpi endpoint."""
    from ray import serve

    from fleet.bench.openpi_bench import format_openpi_table, run_openpi_bench

    save_checkpoint(build_model(tuple(EMBODIMENTS)[:4], 0, TINY), tmp_path / "policy")
    apps_before = set(serve.status().applications)
    result = run_openpi_bench(robot_counts=(2,), seconds_per_point=0.5, repeats=1, checkpoint=tmp_path / "policy")
    openpi, peer = result["results"]
    assert (openpi["route"], peer["route"]) == ("openpi", "peer") and openpi["robots"] == peer["robots"] == 2
    assert openpi["calls_per_s"] > 0 and peer["calls_per_s"] > 0 and openpi["server_batch"] >= 1
    assert openpi["vs_peer"] == pytest.approx(openpi["calls_per_s"] / peer["calls_per_s"])
    assert result["config"]["client"] in ("fleet openpi-framing client", "openpi-client 0.1.2")
    assert "vs peer" in format_openpi_table(result)
    assert set(serve.status().applications) == apps_before  # the bench removed its app
