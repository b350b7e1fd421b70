"""`fleet rtc-finetune`: a short run on the shipped checkpoint writes a new one whose head learned to continue
a committed prefix, marked in its config; the backbone and the other heads are the shipped ones."""

import json

import torch
from typer.testing import CliRunner

from fleet.cli import app


def test_rtc_finetune_writes_a_marked_checkpoint_and_changes_one_head(tmp_path):
    from fleet.policy.checkpoint import load_checkpoint
    from fleet.policy.default import load_policy

    out = tmp_path / "rtc"
    args = ["rtc-finetune", "--out", str(out), "--embodiments", "hello", "--episodes", "2", "--clean-episodes", "1"]
    res = CliRunner().invoke(app, [*args, "--steps", "2", "--delays", "2", "--replan", "4", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["bodies"]["hello"]["committed_rows"] > 0 and result["out"] == str(out)
    tuned, meta = load_checkpoint(out / "policy.safetensors")
    shipped, shipped_meta = load_policy(None)
    assert tuned.config.rtc_trained == ("hello",) and shipped.config.rtc_trained == ()
    assert meta["extra"]["rtc_finetune"]["steps"] == 2 and result["bodies"]["hello"]["replans"] == [4]
    assert set(meta["extra"]) >= set(shipped_meta.get("extra") or {})  # the feature statistics are kept
    a, b = tuned.state_dict(), shipped.state_dict()
    changed = {k for k in b if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("heads.hello.") for k in changed)


def test_rtc_finetune_names_a_bad_body():
    res = CliRunner().invoke(app, ["rtc-finetune", "--out", "x", "--embodiments", "ur5"])
    assert res.exit_code == 2 and "--embodiments" in res.output


def test_rtc_finetune_names_a_bad_replanning_interval():
    for bad in ("0", "2,x", "4,17"):  # hello's chunk holds 16 actions
        res = CliRunner().invoke(app, ["rtc-finetune", "--out", "x", "--embodiments", "hello", "--replan", bad])
        assert res.exit_code == 2 and "--replan" in res.output, bad


def test_rtc_finetune_lr_defaults_to_the_library_value_and_refuses_a_bad_one():
    import inspect

    from fleet.cli.latency_cmds import rtc_finetune_cmd
    from fleet.learning.rtc_round import RTC_LR, rtc_finetune

    assert inspect.signature(rtc_finetune_cmd).parameters["lr"].default == RTC_LR
    assert inspect.signature(rtc_finetune).parameters["lr"].default == RTC_LR
    for bad in ("0", "-1e-3", "nan", "inf"):
        res = CliRunner().invoke(app, ["rtc-finetune", "--out", "x", "--embodiments", "hello", "--lr", bad])
        assert res.exit_code == 2 and "--lr" in res.output, bad
