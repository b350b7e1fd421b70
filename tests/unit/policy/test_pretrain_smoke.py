"""Smoke tests of the training entrypoints with a tiny budget (CleanRL style): they run end to end,
write a loadable checkpoint, and the CLI prints the documented JSON shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from fleet.cli import app  # noqa: E402
from fleet.control.image_ood import ImageStats  # noqa: E402
from fleet.experiments import transfer  # noqa: E402
from fleet.policy.checkpoint import load_checkpoint  # noqa: E402
from fleet.policy.evaluate import evaluate  # noqa: E402
from fleet.policy.train import PretrainConfig, chunk_policy, pretrain  # noqa: E402
from fleet.sim import make_env  # noqa: E402
from fleet.sim.render import apply_lighting  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = PretrainConfig(
        embodiments=("franka", "leap"),
        steps=3,
        batch_size=8,
        warmup=1,
        demo_episodes=4,
        dagger_rounds=1,
        dagger_episodes=2,
        threads=1,
    )
    model, report, meta = pretrain(cfg, out=out, progress=False, log=lambda m: None)
    return out, model, report, meta


def test_pretrain_writes_a_loadable_checkpoint(tiny_run):
    out, model, report, meta = tiny_run
    assert (out / "policy.safetensors").exists() and (out / "policy.json").exists()
    loaded, stored = load_checkpoint(out / "policy")
    assert sorted(loaded.specs) == ["franka", "leap"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    stats = stored["extra"]["feature_stats"]
    assert set(stats) == {"franka", "leap"} and len(stats["franka"]["mean"]) == model.config.d_model
    images = {b: ImageStats.from_dict(d) for b, d in stored["extra"]["image_stats"].items()}  # robots' camera check
    assert set(images) == {"franka", "leap"}
    frame = make_env("leap", seed=5).reset()[0]["image"]
    lit = apply_lighting(frame, 0.55, (40, 25, -10))  # the `lighting` shift
    assert images["leap"].distance(lit) > 3 * images["leap"].distance(frame)
    assert report.samples["franka"] > 0 and len(report.dagger_success) == 1
    assert report.losses and np.isfinite(report.losses[-1][1])


def test_pretrained_policy_runs_closed_loop(tiny_run):
    _, model, _, _ = tiny_run
    result = evaluate(chunk_policy(model), "leap", episodes=2, n_envs=2)
    assert result.episodes == 2 and 0.0 <= result.success_rate <= 1.0 and result.mean_steps > 0


def test_a_seeded_generator_makes_flow_chunks_repeat(tiny_run):
    """`fleet eval --seed` seeds the flow heads' noise: the same seed gives the same chunks, another seed others."""
    import torch

    from fleet.sim import make_env

    _, model, _, _ = tiny_run
    obs, _ = make_env("leap").reset(seed=0)

    def chunks(seed):
        act = chunk_policy(model, generator=torch.Generator().manual_seed(seed))
        return [act([obs], ["leap"])[0] for _ in range(2)]

    first, again, other = chunks(3), chunks(3), chunks(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0]) and not np.array_equal(first[0], first[1])


def test_eval_cli_json_shape(tiny_run):
    out, *_ = tiny_run
    res = CliRunner().invoke(app, ["eval", "-e", "franka", "--episodes", "2", "--checkpoint", str(out), "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(obj) == {"embodiment", "shift", "episodes", "success_rate", "estop_trips", "mean_steps"}
    assert obj["estop_trips"] == 0  # the tiny policy never presses franka 1 cm past the table (the wall)
    assert obj["embodiment"] == "franka" and obj["episodes"] == 2


def test_eval_cli_rejects_unknown_embodiment_and_missing_head(tiny_run):
    out, *_ = tiny_run
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "-e", "spot", "--episodes", "1", "--checkpoint", str(out)])
    assert res.exit_code == 2 and "unknown 'spot'" in res.output
    res = runner.invoke(app, ["eval", "-e", "hello", "--episodes", "1", "--checkpoint", str(out)])
    assert res.exit_code == 2 and "no head for 'hello'" in res.output
    res = runner.invoke(app, ["eval", "-e", "leap", "--episodes", "1", "--checkpoint", str(out), "--shift", "fog"])
    assert res.exit_code == 2 and "fog" in res.output


def test_transfer_experiment_json_shape(tmp_path, monkeypatch):
    result = transfer.run_transfer_experiment(
        steps=2, episodes=2, demo_episodes=3, batch_size=8, out=tmp_path, log=lambda m: None
    )
    assert set(result["joint"]) == {"hello", "franka"} and set(result["alone"]) == {"hello", "franka"}
    assert result["steps"] == 2
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "joint" in transfer.format_table(result)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--image-norm", "batch"], "image_norm must be one of"),
        (["--augment", "--augment-p", "fog=0.2"], "lighting|offset|clutter=SHARE"),
        (["--augment", "--augment-p", "offset=lots"], "offset share must be a number"),
        (["--augment", "--augment-p", "offset=1.5"], "p_offset must be a probability"),
        (["--augment-p", "offset=0.3"], "needs --augment"),
    ],
)
def test_pretrain_cli_rejects_bad_recipe_before_training(tmp_path, args, needle):
    res = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_pretrain_cli_passes_the_recipe_on(tmp_path, monkeypatch):
    """--image-norm and --augment-p reach the PretrainConfig that trains (the run itself is replaced)."""
    import fleet.policy.train as train

    seen = {}

    def fake(cfg, out, progress, log):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(train, "pretrain", fake)
    args = ["pretrain", "--out", str(tmp_path), "--image-norm", "per_image", "--augment"]
    CliRunner().invoke(app, [*args, "--augment-p", "lighting=0,offset=0.35"])
    cfg = seen["cfg"]
    assert cfg.policy.image_norm == "per_image"
    assert (cfg.augment.p_lighting, cfg.augment.p_offset, cfg.augment.p_clutter) == (0.0, 0.35, 0.25)


def test_robust_finetune_cli_passes_the_shares_on(tmp_path, monkeypatch):
    import fleet.policy.robust as robust

    seen = {}

    def fake(model, meta, cfg, out, log):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(robust, "robust_finetune", fake)
    args = ["robust-finetune", "--out", str(tmp_path), "--steps", "2000", "--augment-p", "lighting=0,clutter=0.2"]
    CliRunner().invoke(app, args)
    aug = seen["cfg"].augment
    assert (aug.p_lighting, aug.p_offset, aug.p_clutter) == (0.0, 0.4, 0.2) and seen["cfg"].warmup == 50
    res = CliRunner().invoke(app, ["robust-finetune", "--out", str(tmp_path), "--augment-p", "fog=1"])
    assert res.exit_code == 2 and "lighting|offset|clutter=SHARE" in res.output


def test_augment_shares_as_the_help_writes_them():
    from fleet.policy.augment import parse_augment_shares

    assert parse_augment_shares("lighting=0, offset=0.35, clutter=0.2") == {
        "p_lighting": 0.0,
        "p_offset": 0.35,
        "p_clutter": 0.2,
    }
    assert parse_augment_shares("") == {}
