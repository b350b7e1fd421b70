"""Pretraining: multi-task behaviour cloning on teleoperator demonstrations from every simulator,
with noise-injected demonstrations and DAgger rounds (the policy drives, the expert relabels).

`fleet pretrain` calls `pretrain`; the transfer experiment calls it with fewer embodiments.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fleet.control import FeatureStats
from fleet.embodiments import EMBODIMENTS
from fleet.policy import parallel
from fleet.policy.augment import AugmentConfig, augment_batch
from fleet.policy.backbone import PolicyConfig
from fleet.policy.batch import PolicyBatch, normalize_actions
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.demos import DemoSet, collect
from fleet.policy.model import FleetPolicy
from fleet.policy.tokenizer import default_vocabulary
from fleet.validate import is_int, is_number


def default_policy_config() -> PolicyConfig:
    """The shipped model's sizes: 16 patch tokens (16x16 patches) plus 16 instruction-conditioned keypoint
    tokens keep a training step near 0.13 s on 2 cores while localizing objects to a few millimetres."""
    return PolicyConfig(
        patch_size=16,
        conv_stem=False,
        keypoints=16,
        n_layers=3,
        max_instr_len=8,
        head_layers=2,
        flow_train_noise=2,
        flow_execute_sample=("leap",),
    )


@dataclass(frozen=True)
class PretrainConfig:
    embodiments: tuple[str, ...] = ("franka", "aloha", "hello", "leap")
    # which bodies to train (the transfer experiment trains subsets)
    steps: int = 6000
    # optimizer steps in total, DAgger rounds included
    batch_size: int = 128
    # rows per step, split across embodiments by `mix`
    mix: dict[str, float] | None = None
    # relative share of each embodiment's rows in a batch (None: even); embodiments left out get 1.0
    lr: float = 1e-3
    # peak AdamW learning rate (linear warm-up, cosine decay)
    warmup: int = 200
    # warm-up steps
    weight_decay: float = 0.01
    demo_episodes: int = 1500
    # expert episodes per embodiment before DAgger
    states_per_episode: float = 4.0
    # visited states kept per episode on average: scenes matter more than states, since the states of
    # one episode share one scene, so many episodes with a few states each generalize better
    noise: float = 0.05
    # std of action noise (share of range) injected in half of the expert episodes
    dagger_rounds: int = 4
    # rounds of: roll out the current policy, relabel with the expert, add to the data
    dagger_episodes: int = 250
    # policy-driven episodes per embodiment per DAgger round
    dagger_samples: int | None = None
    # flow samples per call in DAgger rollouts: None = as the fleet runs the policy (4, executing their mean,
    # or one of them for PolicyConfig.flow_execute_sample); 1 is cheaper (the first round's policy times
    # out a lot: 140 s a round with 1 sample, about 4 min with 4, at 300 episodes)
    seed: int = 0
    # seeds data collection, initialisation and batch sampling
    threads: int = 2
    # torch intra-op threads in all (each of `workers` processes gets threads // workers)
    workers: int = 1
    # data-parallel training processes, each computing its share of every embodiment's rows (fleet pretrain
    # runs 2 on 2 threads: a step of 64 rows alone took 0.236 s in one process on 2 threads, 0.20 s + 11.5 ms
    # of all-reduce in two; whole runs gained 3-15 %, as noisy as the machine)
    policy: PolicyConfig = field(default_factory=default_policy_config)
    # model sizes
    augment: AugmentConfig | None = None
    # training-time lighting / camera-offset / clutter shifts on every batch (fleet.policy.augment); None: off

    def __post_init__(self) -> None:
        unknown = [e for e in self.embodiments if e not in EMBODIMENTS]
        if unknown or not self.embodiments:
            raise ValueError(f"PretrainConfig.embodiments: unknown {unknown}; known {sorted(EMBODIMENTS)}")
        for f in ("steps", "batch_size", "demo_episodes"):
            if getattr(self, f) < 1:
                raise ValueError(f"PretrainConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.dagger_samples is not None and not (is_int(self.dagger_samples) and self.dagger_samples >= 1):
            raise ValueError(f"PretrainConfig.dagger_samples must be None or >= 1, got {self.dagger_samples!r}")
        if self.dagger_rounds < 0 or self.dagger_episodes < 0:
            raise ValueError("PretrainConfig.dagger_rounds and dagger_episodes must be >= 0")
        for name, w in (self.mix or {}).items():
            if name not in self.embodiments:
                raise ValueError(f"PretrainConfig.mix: {name!r} is not trained; embodiments {list(self.embodiments)}")
            if not (is_number(w) and math.isfinite(w) and w > 0):
                raise ValueError(f"PretrainConfig.mix[{name!r}] must be a positive number, got {w!r}")
        if not (is_int(self.workers) and 1 <= self.workers <= self.threads):
            raise ValueError(
                f"PretrainConfig.workers must be between 1 and threads ({self.threads}), got {self.workers!r}"
            )
        uneven = {n: r for n, r in self.rows().items() if r % self.workers}
        if uneven:
            raise ValueError(
                f"PretrainConfig.workers: every embodiment's rows per batch must divide by workers ({self.workers}) "
                f"so each data-parallel step computes the one-process gradient; rows {self.rows()}, uneven {uneven}"
            )
        if self.batch_size < len(self.embodiments):
            raise ValueError(
                f"PretrainConfig.batch_size must be >= the number of embodiments ({len(self.embodiments)}), "
                f"got {self.batch_size}"
            )

    def rows(self) -> dict[str, int]:
        """Rows of each embodiment in one batch: `batch_size` split by `mix`, at least one each."""
        w = {n: float((self.mix or {}).get(n, 1.0)) for n in self.embodiments}
        total = sum(w.values())
        return {n: max(1, round(self.batch_size * w[n] / total)) for n in self.embodiments}


def default_workers(cfg: PretrainConfig) -> int:
    """Data-parallel processes `fleet pretrain` runs when not told: one per thread, up to 2, if every
    embodiment's rows split evenly over them; else 1."""
    n = min(2, cfg.threads)
    return n if all(r % n == 0 for r in cfg.rows().values()) else 1


@dataclass
class PretrainReport:
    config: dict
    samples: dict[str, int] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)
    dagger_success: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


class DemoTensors:
    """All demonstrations as tensors ready to slice into mixed-embodiment batches."""

    def __init__(self, model, demos: dict[str, DemoSet]):
        self.model = model
        self.names = list(demos)
        p_max = max(model.specs[n].proprio_dim for n in self.names)
        d_max = max(model.specs[n].action_dim for n in self.names)
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        for name, d in demos.items():
            spec = model.specs[name]
            proprio = np.zeros((len(d), p_max), np.float32)
            proprio[:, : spec.proprio_dim] = d.proprio
            cache: dict[str, np.ndarray] = {}
            instr = np.stack(
                [cache.setdefault(t, model.vocab.encode(t, model.config.max_instr_len)) for t in d.instructions]
            )
            actions = np.zeros((len(d), spec.chunk_size, d_max), np.float32)
            actions[:, :, : spec.action_dim] = normalize_actions(spec, d.actions)
            self.data[name] = {
                "image": torch.from_numpy(np.ascontiguousarray(d.images)),
                "proprio": torch.from_numpy(proprio),
                "instr": torch.from_numpy(instr),
                "actions": torch.from_numpy(actions),
                "emb": torch.full((len(d),), model.vocab.token_id(spec.token), dtype=torch.long),
            }
            if d.focus is not None and np.isfinite(d.focus).all():
                self.data[name]["focus"] = torch.from_numpy(np.ascontiguousarray(d.focus, dtype=np.float32))

    def batch(self, batch_size: int | dict[str, int], gen: torch.Generator):
        """A mixed batch: `batch_size` rows split evenly, or a dict of rows per embodiment."""
        per_name = isinstance(batch_size, dict)
        rows = batch_size if per_name else dict.fromkeys(self.names, max(1, batch_size // len(self.names)))
        parts, names = [], []
        for name in self.names:
            d = self.data[name]
            per = rows[name]
            idx = torch.randint(0, len(d["image"]), (per,), generator=gen)
            parts.append({k: v.index_select(0, idx) for k, v in d.items()})
            names += [name] * per
        keys = set.intersection(*(set(p) for p in parts))
        cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
        return PolicyBatch(
            cat["image"], cat["proprio"], cat["instr"], cat["emb"], names, cat["actions"], focus=cat.get("focus")
        )


DAGGER_ENVS = 64
# DAgger episodes run this many at a time, so the policy is queried in batches of up to 64 rows: 128
# episodes per body took 41 s at 16 and 24 s at 64 (shipped checkpoint, 2 threads)
FLOW_SAMPLES = 4  # flow heads execute the mean of this many samples (it also feeds the disagreement confidence)


def chunk_policy(
    model, n_samples: int | None = None, generator: torch.Generator | None = None
) -> Callable[[list[dict], list[str]], list[np.ndarray]]:
    """Wrap a FleetPolicy as a ChunkPolicy (observations, embodiment names) -> physical chunks.
    n_samples None: FLOW_SAMPLES when any row uses a flow head, else 1. generator: where flow heads draw their
    noise (a seeded one makes a run repeat exactly); None = torch's global generator."""

    def act(observations: list[dict], names: list[str]) -> list[np.ndarray]:
        model.eval()
        k = n_samples or (FLOW_SAMPLES if any(model.specs[n].head == "flow" for n in names) else 1)
        return [r["chunk"] for r in model.predict_obs(observations, names, n_samples=k, generator=generator)]

    return act


def build_model(embodiments: tuple[str, ...], seed: int = 0, config: PolicyConfig | None = None):
    torch.manual_seed(seed)
    specs = {n: EMBODIMENTS[n] for n in embodiments}
    return FleetPolicy(config or default_policy_config(), specs, default_vocabulary(list(EMBODIMENTS)))


def fit_feature_stats(model, tensors: DemoTensors, n: int = 2048, seed: int = 0) -> dict[str, dict]:
    """Per-embodiment mean/covariance of the pooled backbone feature on training data (for OOD scores)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    model.eval()
    with torch.inference_mode():
        for name in tensors.names:
            d = tensors.data[name]
            idx = torch.randperm(len(d["image"]), generator=gen)[:n]
            feats = []
            for chunk in idx.split(256):
                sl = {k: v.index_select(0, chunk) for k, v in d.items()}
                b = PolicyBatch(sl["image"], sl["proprio"], sl["instr"], sl["emb"], [name] * len(chunk), None)
                feats.append(model.encode(b)[2].numpy())
            out[name] = FeatureStats.fit(np.concatenate(feats)).to_dict()
    return out


def fit_image_stats_on(tensors: DemoTensors, n: int = 2048, seed: int = 0) -> dict[str, dict]:
    """Per-embodiment camera-image statistics (fleet.control.image_ood) of the clean training frames: robots
    read them from the checkpoint and flag a changed light, camera or table (`extra.image_stats`)."""
    from fleet.control.image_ood import ImageStats

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in tensors.names:
        images = tensors.data[name]["image"]
        idx = torch.randperm(len(images), generator=gen)[:n]
        out[name] = ImageStats.fit(images.index_select(0, idx).numpy()).to_dict()
    return out


def pretrain(
    cfg: PretrainConfig,
    out: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """Train a FleetPolicy from scratch; returns (model, report, meta). Writes a checkpoint when `out` is set.

    With `cfg.workers` > 1 the other ranks run in spawned processes and this one is rank 0."""
    if cfg.workers == 1:
        return _run(cfg, 0, out, progress, log)
    store = parallel.rendezvous_file()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(cfg, r, store), daemon=True) for r in range(1, cfg.workers)]
    for p in procs:
        p.start()
    try:
        return _run(cfg, 0, out, progress, log, store=store)
    except Exception as exc:
        for r, p in enumerate(procs, 1):
            p.join(timeout=5)
            if p.exitcode not in (None, 0):
                raise RuntimeError(f"pretrain: data-parallel rank {r} exited with code {p.exitcode}") from exc
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
        torch.set_num_threads(cfg.threads)
        if os.path.exists(store):
            os.unlink(store)


def _worker(cfg: PretrainConfig, rank: int, store: str) -> None:
    """A data-parallel rank other than 0: trains its share of each batch; rank 0 keeps the result."""
    _run(cfg, rank, None, False, lambda m: None, store=store)


def _run(cfg: PretrainConfig, rank: int, out: Path | None, progress: bool, log: Callable, store: str | None = None):
    """The training itself, on every rank; rank 0 returns (model, report, meta), the others None."""
    t0 = time.perf_counter()
    world = cfg.workers
    torch.set_num_threads(max(1, cfg.threads // world))
    if world > 1:
        parallel.init(rank, world, store)
    try:
        run = _Pretraining(cfg, rank, world, log)
        run.collect_demos()
        tensors = run.fit(progress, t0)
        if world > 1:
            parallel.check_in_sync(run.model)
        run.model.eval()
        run.report.samples = {n: len(d) for n, d in run.demos.items()}
        if rank != 0:
            return None
        torch.set_num_threads(cfg.threads)
        return run.finish(tensors, out, t0)
    finally:
        if world > 1:
            parallel.shutdown()


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 5% of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(cfg: PretrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    try:  # the fused kernel is 16% of a step faster on 2 CPU cores (0.285 -> 0.240 s, batch 64)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a build without the fused CPU kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


class _Pretraining:
    """One rank's run: the model, the demonstrations (this rank collects those `owner` gives it, then all
    ranks share them), the optimizer steps with DAgger rounds among them, and the report."""

    def __init__(self, cfg: PretrainConfig, rank: int, world: int, log: Callable[[str], None]) -> None:
        self.cfg, self.rank, self.world, self.log = cfg, rank, world, log
        self.model = build_model(cfg.embodiments, cfg.seed, cfg.policy)
        if world > 1:
            parallel.broadcast_params(self.model)
        self.owner = parallel.assign(cfg.embodiments, world)
        if world > 1:
            log(f"data-parallel over {world} processes; collection by rank: {self.owner}")
        self.report = PretrainReport(config=asdict(cfg))
        self.demos: dict[str, DemoSet] = {}
        self.keep: dict[str, float] = {}  # share of visited states kept per embodiment (states_per_episode)

    def collect_demos(self) -> None:
        """Expert demonstrations, half of them with injected action noise; sets the proprio statistics."""
        cfg = self.cfg
        for i, name in enumerate(cfg.embodiments):
            pilot = collect(name, 10, seed=cfg.seed * 1000 + 10 * i + 9)
            self.keep[name] = min(1.0, cfg.states_per_episode * pilot.episodes / max(1, len(pilot)))
            if self.owner[name] != self.rank:
                continue
            half = cfg.demo_episodes // 2
            clean = collect(name, cfg.demo_episodes - half, seed=cfg.seed * 1000 + 10 * i, keep=self.keep[name])
            noisy = collect(name, half, seed=cfg.seed * 1000 + 10 * i + 1, noise=cfg.noise, keep=self.keep[name])
            self.demos[name] = clean.extend(noisy)
        if self.world > 1:
            self.demos = parallel.share_demos(self.demos, self.owner, cfg.embodiments)
        for name, d in self.demos.items():
            self.log(f"demos {name}: {len(d)} samples from {cfg.demo_episodes} expert episodes")
            self.model.set_proprio_stats(name, d.proprio.mean(0), d.proprio.std(0) + 1e-3)

    def dagger_round(self, step: int) -> None:
        """The current policy drives, the expert relabels; the episodes join the demonstrations."""
        cfg, model = self.cfg, self.model
        new_sets = {}
        for i, name in enumerate(cfg.embodiments):
            if self.owner[name] != self.rank:
                continue
            new_sets[name] = collect(
                name,
                cfg.dagger_episodes,
                seed=cfg.seed * 1000 + 500 + 10 * i + step,
                policy=chunk_policy(model, n_samples=cfg.dagger_samples),
                keep=self.keep[name],
                n_envs=DAGGER_ENVS,
            )
        if self.world > 1:
            parallel.check_in_sync(model)
            new_sets = parallel.share_demos(new_sets, self.owner, cfg.embodiments)
        rates = {n: new_sets[n].successes / max(1, new_sets[n].episodes) for n in cfg.embodiments}
        self.demos = {n: self.demos[n].extend(new_sets[n]) for n in cfg.embodiments}
        self.report.dagger_success.append(rates)
        self.log(f"step {step}: DAgger round, policy success while collecting {rates}")

    def fit(self, progress: bool, t0: float) -> DemoTensors:
        """Every optimizer step (DAgger rounds among them); returns the final demonstrations' tensors."""
        cfg, model, world = self.cfg, self.model, self.world
        tensors = DemoTensors(model, self.demos)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(cfg, params)
        dagger_at = {int(cfg.steps * (k + 1) / (cfg.dagger_rounds + 1)) for k in range(cfg.dagger_rounds)}
        # rank 0 samples as a single process would; the other ranks from their own streams
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.rank)
        rows = cfg.rows()
        self.log(f"rows per batch: {rows}")
        rows = parallel.split_rows(rows, world)
        bar = _progress(progress)
        task = bar.add_task("pretrain", total=cfg.steps) if bar else None
        running = None
        with bar if bar is not None else contextlib.nullcontext():  # a Progress shows from enter to exit
            for step in range(cfg.steps):
                if step in dagger_at and cfg.dagger_episodes > 0:
                    self.dagger_round(step)
                    tensors = DemoTensors(model, self.demos)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(cfg, step)
                batch = tensors.batch(rows, gen)
                if cfg.augment is not None:
                    batch, _ = augment_batch(batch, gen, cfg.augment)
                value = _step(model, opt, params, batch, gen, world)
                running = value if running is None else 0.98 * running + 0.02 * value
                if step % 50 == 0 or step == cfg.steps - 1:
                    self.report.losses.append((step, running))
                if bar:
                    bar.update(task, advance=1, description=f"pretrain loss {running:.3f}")
                elif (step + 1) % 250 == 0:  # no bar (--json): a line now and then, to stderr
                    self.log(f"step {step + 1}/{cfg.steps} loss {running:.3f} ({time.perf_counter() - t0:.0f} s)")
        return tensors

    def finish(self, tensors: DemoTensors, out: Path | None, t0: float):
        """(model, report, meta) on rank 0, the checkpoint and report written to `out` when set."""
        cfg, model, report = self.cfg, self.model, self.report
        meta = {
            "feature_stats": fit_feature_stats(model, tensors, seed=cfg.seed),
            "image_stats": fit_image_stats_on(tensors, seed=cfg.seed),
            "pretrain": {"config": asdict(cfg), "samples": report.samples, "dagger_success": report.dagger_success},
        }
        report.seconds = time.perf_counter() - t0
        meta["pretrain"]["seconds"] = report.seconds
        if out is not None:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, out / "policy", extra_meta=meta)
            (out / "pretrain_report.json").write_text(json.dumps(asdict(report), indent=1))
        return model, report, meta


def _step(model, opt, params: list, batch, gen: torch.Generator, world: int) -> float:
    """One optimizer step on `batch`; returns the loss (averaged over the ranks when world > 1)."""
    model.train()
    loss, _ = model.action_loss(batch, generator=gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    value = parallel.average_gradients(params, loss, world) if world > 1 else loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return value


def _progress(enabled: bool):
    if not enabled:
        return None
    # lazily: rich only for an interactive run (--json and the tests run without the bar)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
