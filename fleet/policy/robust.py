"""Robust fine-tuning: continue a trained checkpoint on fresh demonstrations with every batch under the
training-time shifts of fleet.policy.augment (random lighting, camera offsets, clutter).

The full recipe with augmentation is `fleet pretrain --augment` (6000 steps from scratch, 27 min on 2
quiet cores). This is the cheap route from a checkpoint that already solves the clean tasks: a few hundred
expert (clean and noise-injected) and policy-driven, expert-relabelled (DAgger) episodes per body from
seeds the checkpoint never trained on, then ~1000 low-learning-rate steps on augmented batches, so the
vision encoder learns to ignore what the shifts change while the heads keep what they know. The proprio
normalisation stays the checkpoint's; the OOD feature statistics are refit on clean frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fleet.policy.augment import AugmentConfig, augment_batch
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.demos import DemoSet, collect
from fleet.policy.train import (
    DAGGER_ENVS,
    DemoTensors,
    PretrainConfig,
    _lr_at,
    _optimizer,
    _step,
    chunk_policy,
    fit_feature_stats,
)
from fleet.validate import is_int


@dataclass(frozen=True)
class RobustConfig:
    steps: int = 1000
    # optimizer steps on augmented batches
    batch_size: int = 64
    # rows per step, split evenly over the checkpoint's bodies
    lr: float = 3e-4
    # peak learning rate (a third of pretraining's: the weights already solve the clean tasks)
    warmup: int = 50
    demo_episodes: int = 400
    # expert episodes per body (half with action noise)
    dagger_episodes: int = 150
    # episodes per body driven by the checkpoint's own policy, relabelled by the expert
    noise: float = 0.05
    states_per_episode: float = 4.0
    seed: int = 7
    # collection seeds are 7000 + 10 i + k for seed 7: never pretraining's (0..39, 500..) nor evaluation's
    threads: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "demo_episodes", "threads"):
            v = getattr(self, f)
            if not (is_int(v) and v >= 1):
                raise ValueError(f"RobustConfig.{f} must be a whole number >= 1, got {v!r}")
        if not (is_int(self.dagger_episodes) and self.dagger_episodes >= 0):
            raise ValueError(f"RobustConfig.dagger_episodes must be a whole number >= 0, got {self.dagger_episodes!r}")
        if not (0 < self.lr < 1) or not (0 <= self.warmup < self.steps):
            raise ValueError(
                f"RobustConfig: lr must be in (0, 1) and warmup in [0, steps); got {self.lr}, {self.warmup}"
            )


def robust_finetune(
    model, meta: dict, cfg: RobustConfig, out: Path | None = None, log: Callable[[str], None] = print
) -> tuple[object, dict]:
    """Fine-tune `model` (loaded with `meta`) in place; returns (model, report). Writes out/policy.* when set."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    names = list(model.specs)
    demos: dict[str, DemoSet] = {}
    dagger_success = {}
    base = cfg.seed * 1000
    for i, name in enumerate(names):
        pilot = collect(name, 10, seed=base + 10 * i + 9)
        keep = min(1.0, cfg.states_per_episode * pilot.episodes / max(1, len(pilot)))
        half = cfg.demo_episodes // 2
        d = collect(name, cfg.demo_episodes - half, seed=base + 10 * i, keep=keep)
        d = d.extend(collect(name, half, seed=base + 10 * i + 1, noise=cfg.noise, keep=keep))
        if cfg.dagger_episodes:
            model.eval()
            dag = collect(
                name,
                cfg.dagger_episodes,
                seed=base + 10 * i + 2,
                policy=chunk_policy(model),
                keep=keep,
                n_envs=DAGGER_ENVS,
            )
            dagger_success[name] = dag.successes / max(1, dag.episodes)
            d = d.extend(dag)
        demos[name] = d
        log(f"robust demos {name}: {len(d)} samples ({time.perf_counter() - t0:.0f} s)")
    tensors = DemoTensors(model, demos)
    opt_cfg = PretrainConfig(
        embodiments=tuple(names), steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, threads=cfg.threads
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(opt_cfg, params)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = dict.fromkeys(names, max(1, cfg.batch_size // len(names)))
    running, losses = None, []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(opt_cfg, step)
        batch, _ = augment_batch(tensors.batch(rows, gen), gen, cfg.augment)
        value = _step(model, opt, params, batch, gen, 1)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == cfg.steps - 1:
            losses.append((step, running))
        if (step + 1) % 100 == 0:
            log(f"robust step {step + 1}/{cfg.steps} loss {running:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    extra = dict(meta.get("extra") or {})
    extra["feature_stats"] = fit_feature_stats(model, tensors, seed=cfg.seed)
    report = {
        "config": asdict(cfg),
        "samples": {n: len(d) for n, d in demos.items()},
        "dagger_success": dagger_success,
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    extra["robust_finetune"] = {k: v for k, v in report.items() if k != "losses"}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, out / "policy", extra_meta=extra)
    return model, report
