"""`fleet bench infer` and `fleet experiment quantize` run end to end on a tiny checkpoint with a tiny budget and
print one valid JSON object (the figures themselves are the benchmark's business, not the tests')."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.train import build_model
from tests.mocks.tiny_policy import TINY

ROW_KEYS = {"technique", "batch", "baseline_ms", "ms", "speedup", "max_action_diff", "success_delta"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    # one token head and one flow head (an ONNX export traces a token head's whole decode: seconds each)
    save_checkpoint(build_model(("franka", "aloha"), 0, dataclasses.replace(TINY, keypoints=2)), path)
    return path


def test_bench_infer_prints_valid_json_and_writes_the_plot(checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["bench", "infer", "--json", "--checkpoint", str(checkpoint), "--batch", "1,3", "--episodes", "1"]
    args += ["--repeats", "1", "--embodiments", "franka", "--out", str(out)]
    # ONNX Runtime runs in the quantize test below, on the flow head only (quick to export)
    result = CliRunner().invoke(
        app, args + ["--techniques", "bf16,int8,kv-cache,encoder-cache,encoder-cache-call,recycling,lora-merge"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    rows = data["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    keys = {r["key"] for r in rows}
    assert keys == {
        "bf16",
        "int8",
        "kv-cache",
        "encoder-cache",
        "encoder-cache-call",
        "recycling",
        "lora-merge",
    }
    assert {r["batch"] for r in rows} == {1, 3}
    for r in rows:
        assert r["ms"] > 0 and r["baseline_ms"] > 0 and r["speedup"] > 0
    by_key = {(r["key"], r["batch"]): r for r in rows}
    # exact techniques are measured exact; ONNX fp32 within its tolerance; success measured for the backends
    for key in ("kv-cache", "encoder-cache", "encoder-cache-call"):
        assert by_key[(key, 1)]["max_action_diff"] == 0.0 and by_key[(key, 1)]["success_delta"] == 0.0
    assert by_key[("lora-merge", 3)]["max_action_diff"] < 1e-5
    assert isinstance(by_key[("int8", 1)]["success_delta"], float)
    assert data["model"]["random_init"] is False and data["config"]["embodiments"] == ["franka"]
    assert (out / "infer_accuracy_vs_speed.png").stat().st_size > 0 and (out / "bench_infer.json").exists()


def test_experiment_quantize_and_bad_options(checkpoint) -> None:
    args = ["experiment", "quantize", "--json", "--checkpoint", str(checkpoint), "--batch", "2", "--episodes", "0"]
    result = CliRunner().invoke(app, args + ["--repeats", "1", "--embodiments", "aloha"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert {r["key"] for r in data["rows"]} == {"bf16", "int8", "onnx-fp32", "onnx-int8"}
    assert next(r for r in data["rows"] if r["key"] == "onnx-fp32")["max_action_diff"] < 1e-4
    assert all(r["success_delta"] is None for r in data["rows"])  # --episodes 0: not evaluated
    for bad, message in ((["--batch", "0"], "--batch"), (["--techniques", "tensorrt"], "--techniques")):
        result = CliRunner().invoke(app, ["bench", "infer", "--checkpoint", str(checkpoint), *bad])
        assert result.exit_code == 2 and message in result.output
    result = CliRunner().invoke(app, ["bench", "infer", "--checkpoint", str(checkpoint), "--embodiments", "spot"])
    assert result.exit_code == 2 and "spot" in result.output
