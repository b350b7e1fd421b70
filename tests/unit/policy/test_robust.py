"""Augmented pretraining and robust fine-tuning, end to end with a tiny budget."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fleet.policy.augment import AugmentConfig  # noqa: E402
from fleet.policy.checkpoint import load_checkpoint  # noqa: E402
from fleet.policy.robust import RobustConfig, robust_finetune  # noqa: E402
from fleet.policy.train import PretrainConfig, pretrain  # noqa: E402


@pytest.mark.slow  # 20-50 s on 2 shared cores
def test_augmented_pretrain_then_robust_finetune_write_loadable_checkpoints(tmp_path):
    cfg = PretrainConfig(
        embodiments=("hello", "leap"),
        steps=3,
        batch_size=8,
        warmup=1,
        demo_episodes=4,
        dagger_rounds=0,
        threads=1,
        augment=AugmentConfig(),
    )
    model, _, meta = pretrain(cfg, out=tmp_path / "pre", progress=False, log=lambda m: None)
    assert meta["pretrain"]["config"]["augment"]["max_offset"] == 3  # the ranges are recorded
    model, meta = load_checkpoint(tmp_path / "pre" / "policy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rcfg = RobustConfig(steps=3, batch_size=8, warmup=1, demo_episodes=4, dagger_episodes=0, threads=1)
    model, report = robust_finetune(model, meta, rcfg, out=tmp_path / "robust", log=lambda m: None)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    kept = [k for k in before if k.endswith(("stem.mean", "stem.std"))]
    assert len(kept) == 4 and all(torch.equal(before[k], after[k]) for k in kept)  # the proprio normalisation kept
    assert any(k.startswith("backbone.") for k in changed)  # the vision and backbone weights were trained
    assert set(report["samples"]) == {"hello", "leap"} and len(report["losses"]) >= 1
    loaded, meta2 = load_checkpoint(tmp_path / "robust" / "policy")
    assert set(meta2["extra"]["feature_stats"]) == {"hello", "leap"}
    assert meta2["extra"]["robust_finetune"]["config"]["steps"] == 3
    assert meta2["extra"]["pretrain"] == meta["extra"]["pretrain"]  # the recipe it started from stays recorded


@pytest.mark.parametrize(
    "kwargs, field", [({"steps": 0}, "steps"), ({"dagger_episodes": -1}, "dagger_episodes"), ({"lr": 2.0}, "lr")]
)
def test_bad_robust_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RobustConfig.*{field}"):
        RobustConfig(**kwargs)
