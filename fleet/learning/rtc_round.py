"""Training-time real-time chunking: teach one head to continue a committed prefix (issue 20).

    rows = collect_rtc_rows(model, "franka", episodes=300, seed=92_000, clean_episodes=300)
    report = train_rtc_head(model, "franka", rows, steps=1500)   # the head alone; nothing else changes
    save_checkpoint(model, "runs/rtc/policy.safetensors")        # model.config.rtc_trained now names franka

Inference-time RTC asks a head trained on the expert's own chunks to continue a plan it never saw continued:
the first steps of every training chunk agreed with its observation, so the head learned to ignore them. The rows
here are the states the policy itself reaches while running `rtc` under a delay drawn per episode (DAgger): at
every request, the observation, the committed prefix as the safety layer sends it, and the simulator expert's
chunk that starts with that prefix and continues from where it leads (`FleetEnv.expert_chunk(prefix=...)`).
Clean expert demonstrations (nothing committed) keep what the head did without delay. The head trains on the
frozen backbone's output, computed once per row, with the committed steps given and left out of the loss
(arXiv 2512.05964): a token head sees them teacher-forced, as decoding forces a prefix; a flow head sees them
clean at flow time 1, and samples that way from then on (`PolicyConfig.rtc_trained`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fleet.control import ActionBuffer, SafetyLayer
from fleet.embodiments import get_embodiment
from fleet.sim import make_env
from fleet.validate import check_int, check_number

ENCODE_BATCH = 256  # rows per frozen backbone call when caching the memory
TRAIN_SEED = 92_000  # the collection's scenes: apart from every evaluation block (EVAL_SEED_BASE + block)
RTC_LR = 1e-3  # the head's peak learning rate (AdamW; each round decays it linearly to a tenth)


def default_replans(spec) -> tuple[int, ...]:
    """The replanning intervals `rtc_finetune` draws from unless told: the body's own (`recompute_every`) and half
    of it. A head that saw only its own interval lets a robot that replans faster under delay oscillate (leap's
    rtc 3 ticks late, seed block 18: 45.5 % every 2 ticks against 97 % every 4); with both in its rows, 96.5 / 96."""
    own = int(spec.recompute_every)
    return tuple(sorted({max(1, own // 2), own}))


@dataclass
class RtcRows:
    """Training rows of one body: observations, the committed steps of each, and the expert's chunk."""

    name: str
    images: list = field(default_factory=list)  # (64, 64, 3) uint8 each
    proprio: list = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)  # steps of the label given by the prefix (0: none)
    labels: list = field(default_factory=list)  # (T, D) float32 physical units, the first `committed` the prefix
    episodes: int = 0
    successes: int = 0  # the policy's episodes that succeeded while collecting

    def __len__(self) -> int:
        return len(self.labels)

    def extend(self, other: RtcRows) -> RtcRows:
        """These rows and `other`'s (the same body), as a new set: DAgger rounds aggregate."""
        if other.name != self.name:
            raise ValueError(f"rows: expected rows of {self.name!r}, got {other.name!r}")
        out = RtcRows(self.name, episodes=self.episodes + other.episodes, successes=self.successes + other.successes)
        for f in ("images", "proprio", "instructions", "committed", "labels"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        return out

    def add(self, obs: dict, committed: int, label: np.ndarray) -> None:
        self.images.append(np.asarray(obs["image"]))
        self.proprio.append(np.asarray(obs["proprio"], np.float32))
        self.instructions.append(str(obs["instruction"]))
        self.committed.append(int(committed))
        self.labels.append(np.asarray(label, np.float32))

    def observations(self, start: int = 0, stop: int | None = None) -> list[dict]:
        keys = range(len(self))[start:stop]
        return [
            {"image": self.images[i], "proprio": self.proprio[i], "instruction": self.instructions[i]} for i in keys
        ]


@dataclass
class RtcReport:
    steps: int = 0
    seconds: float = 0.0
    rows: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per logged block of steps


def collect_rtc_rows(
    model,
    name: str,
    episodes: int,
    seed: int = TRAIN_SEED,
    delays: Sequence[int] = (0, 1, 2, 3),
    clean_episodes: int = 0,
    clean_keep: float = 1.0,
    n_envs: int = 50,
    generator_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    replans: Sequence[int] | None = None,
) -> RtcRows:
    """Run the policy `model` in `rtc` mode on `episodes` scenes of body `name` (each with a delay drawn from
    `delays`, replies exactly that many ticks late, and a replanning interval drawn from `replans`, None: the
    body's own `recompute_every`) and turn every request into a row; then add the states of `clean_episodes`
    expert episodes (a share `clean_keep` of them, nothing committed). progress(episodes done, episodes) after each
    finished episode. Flow heads draw one sample per request here (the states matter, not the confidence)."""
    import torch

    from fleet.policy.batch import set_row_options
    from fleet.policy.demos import collect

    check_int("episodes", episodes, lo=1, expected="a positive int")
    check_int("clean_episodes", clean_episodes, lo=0, expected="a non-negative int")
    spec = get_embodiment(name)
    for d in delays:
        check_int("delays", d, 0, spec.chunk_size - 1)
    replans = [spec.recompute_every] if replans is None else list(replans)
    if not replans:
        raise ValueError("replans: expected at least one interval, got none")
    for r in replans:
        check_int("replans", r, 1, spec.chunk_size)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(generator_seed)
    rows = RtcRows(name)
    next_ep, robots = 0, []
    while next_ep < episodes or robots:
        while len(robots) < n_envs and next_ep < episodes:
            env = make_env(name)
            obs, _ = env.reset(seed=seed * 100_003 + next_ep)
            delay = int(rng.choice(list(delays)))
            replan = replans[0] if len(replans) == 1 else int(rng.choice(replans))
            buf = ActionBuffer(spec.chunk_size, replan, aggregate="rtc")
            robots.append(_Robot(env, obs, buf, SafetyLayer(spec), delay))
            next_ep += 1
        for r in robots:
            r.deliver()
        asking = [r for r in robots if r.pending is None and r.buf.needs_refill(r.tick)]
        if asking:
            prefixes = []
            for r in asking:
                rtc = r.buf.request_prefix(r.tick, lambda plan, r=r: r.safety.preview(plan, r.obs["proprio"]))
                prefixes.append(None if rtc is None else (rtc["prefix"], rtc["prefix_delay"]))
                r.buf.mark_requested(r.tick)
                committed = None if rtc is None else rtc["prefix"][: rtc["prefix_delay"]]
                label = r.env.unwrapped.expert_chunk(prefix=committed)
                rows.add(r.obs, 0 if committed is None else len(committed), label)
            batch = model.collate([r.obs for r in asking], [name] * len(asking))
            set_row_options(batch, model.specs, prefixes=prefixes)
            for r, reply in zip(asking, model.predict(batch, n_samples=1, generator=gen), strict=True):
                r.pending = (r.tick + r.delay, reply["chunk"], r.tick)
        still = []
        for r in robots:
            r.deliver()
            done, ok = r.step(spec)
            if not done:
                still.append(r)
                continue
            rows.episodes += 1
            rows.successes += int(ok)
            if progress is not None:
                progress(rows.episodes, episodes)
        robots = still
    if clean_episodes:
        demos = collect(name, clean_episodes, seed=seed + 1, keep=clean_keep)
        for i in range(len(demos)):
            obs = {"image": demos.images[i], "proprio": demos.proprio[i], "instruction": demos.instructions[i]}
            rows.add(obs, 0, demos.actions[i])
    return rows


@dataclass
class _Robot:
    env: object
    obs: dict
    buf: ActionBuffer
    safety: SafetyLayer
    delay: int
    tick: int = 0
    force: float = 0.0
    pending: tuple | None = None  # (arrival tick, chunk, obs_tick)

    def deliver(self) -> None:
        if self.pending is not None and self.pending[0] <= self.tick:
            self.buf.push(self.pending[1], self.pending[2])
            self.pending = None

    def step(self, spec) -> tuple[bool, bool]:
        sent, _ = self.safety(self.buf.pop(self.tick), force=self.force, proprio=self.obs["proprio"])
        sent = np.clip(np.asarray(sent, np.float32), spec.action_low, spec.action_high)
        self.obs, _, term, trunc, info = self.env.step(sent)
        self.force = float(info.get("force", 0.0))
        self.tick += 1
        return bool(term or trunc), bool(info.get("is_success", False))


def train_rtc_head(
    model,
    name: str,
    rows: RtcRows,
    steps: int = 1500,
    batch_size: int | None = None,
    lr: float = RTC_LR,
    seed: int = 0,
    log_every: int = 100,
    progress: Callable[[int, float], None] | None = None,
) -> RtcReport:
    """Train head `name` of `model` alone on `rows` for `steps` steps (AdamW, lr decaying linearly to a tenth),
    the committed steps of each row given and left out of the loss; then mark the head rtc-trained
    (`FleetPolicy.mark_rtc_trained`). The backbone and every other head are not touched. batch_size: None =
    64 rows for a token head, 32 for a flow head (each row draws several noises)."""
    import torch

    from fleet.policy.batch import normalize_actions

    check_int("steps", steps, lo=1, expected="a positive int")
    if rows.name != name or len(rows) == 0:
        raise ValueError(f"rows: expected rows of {name!r}, got {len(rows)} of {rows.name!r}")
    spec = model.specs[name]
    head = model.head(name)
    batch_size = batch_size or (32 if spec.head == "flow" else 64)
    t0 = time.perf_counter()
    memory, pad = [], []
    with torch.inference_mode():
        for start in range(0, len(rows), ENCODE_BATCH):
            obs = rows.observations(start, start + ENCODE_BATCH)
            m, p, _ = model.encode(model.collate(obs, [name] * len(obs)))
            memory.append(m.float().clone())
            pad.append(p.clone())
    memory_t, pad_t = torch.cat(memory), torch.cat(pad)
    actions = torch.from_numpy(normalize_actions(spec, np.stack(rows.labels)))
    committed = torch.tensor(rows.committed, dtype=torch.long)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    report = RtcReport(rows=len(rows))
    block: list[float] = []
    head.train()
    try:
        for step in range(steps):
            idx = torch.randint(0, len(rows), (batch_size,), generator=gen)
            loss, _ = head.loss(memory_t[idx], pad_t[idx], actions[idx], gen, committed=committed[idx])
            for group in opt.param_groups:
                group["lr"] = lr * (1.0 - 0.9 * step / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            report.steps += 1
            block.append(float(loss.detach()))
            if len(block) >= log_every:
                report.losses.append(float(np.mean(block)))
                block = []
                if progress is not None:
                    progress(report.steps, report.losses[-1])
    finally:
        head.eval()
    if block:
        report.losses.append(float(np.mean(block)))
    model.mark_rtc_trained(name)
    report.seconds = time.perf_counter() - t0
    return report


def rtc_finetune(
    model,
    meta: dict,
    names: Sequence[str],
    episodes: int = 300,
    clean_episodes: int = 300,
    steps: int = 3000,
    delays: Sequence[int] = (0, 1, 2, 3),
    seed: int = TRAIN_SEED,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    rounds: int = 4,
    replans: Sequence[int] | None = None,
    lr: float = RTC_LR,
) -> dict:
    """Training-time RTC for each body in `names`: `rounds` DAgger rounds (each collects `episodes` rtc episodes
    with the head as it is now, adds them to the rows so far, and trains `steps` more steps on all of them; the
    clean expert states come once, in the first; each episode replans at an interval drawn from `replans`, None:
    `default_replans`, the body's own and half of it; the head's learning rate peaks at `lr` each round), then
    the checkpoint at `out` (policy.safetensors / policy.json; the metadata's extras kept: the backbone, and with
    it the feature statistics, is unchanged).
    Returns {"bodies": {name: {rows, committed_rows, policy_success (per round), collect_s, train_s,
    final_loss, replans}}, "seconds"}."""
    from fleet.policy.checkpoint import save_checkpoint

    say = log or (lambda _m: None)
    unknown = [n for n in names if n not in model.specs]
    if not names or unknown:
        raise ValueError(f"embodiments: expected bodies of the checkpoint {sorted(model.specs)}, got {list(names)}")
    started = time.perf_counter()
    bodies = {}
    check_int("rounds", rounds, lo=1, expected="a positive int")
    lr = check_number("lr", lr, expected="a positive finite number")
    if lr <= 0:
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    for name in names:
        rows, success, collect_s, train_s, report = None, [], 0.0, 0.0, None
        body_replans = tuple(replans) if replans is not None else default_replans(model.specs[name])
        for k in range(rounds):
            t0 = time.perf_counter()

            def collected(done: int, total: int, name: str = name, t0: float = t0, k: int = k) -> None:
                if done % 50 == 0 or done == total:
                    say(f"{name} round {k + 1}: {done}/{total} rtc episodes ({time.perf_counter() - t0:.0f} s)")

            clean = clean_episodes if k == 0 else 0
            new = collect_rtc_rows(
                model, name, episodes, seed + 10 * k, delays, clean, progress=collected, replans=body_replans
            )
            rows = new if rows is None else rows.extend(new)
            collect_s += time.perf_counter() - t0
            success.append(new.successes / max(1, new.episodes))
            say(
                f"{name} round {k + 1}: {len(rows)} rows, {np.count_nonzero(rows.committed)} committed; "
                f"policy ok {new.successes}/{new.episodes}"
            )

            def trained(step: int, loss: float, name: str = name, k: int = k) -> None:
                if step % 300 == 0 or step == steps:
                    say(f"{name} round {k + 1}: step {step}/{steps} loss {loss:.4f}")

            report = train_rtc_head(model, name, rows, steps, lr=lr, seed=seed + k, progress=trained)
            train_s += report.seconds
        bodies[name] = {
            "rows": len(rows),
            "committed_rows": int(np.count_nonzero(rows.committed)),
            "policy_success": success,
            "collect_s": round(collect_s, 1),
            "train_s": round(train_s, 1),
            "final_loss": report.losses[-1] if report.losses else None,
            "replans": [int(r) for r in body_replans],
        }
    result = {"bodies": bodies, "seconds": round(time.perf_counter() - started, 1)}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        extra = dict(meta.get("extra") or {})
        settings = {"episodes": episodes, "clean_episodes": clean_episodes, "steps": steps, "rounds": rounds, "lr": lr}
        extra["rtc_finetune"] = settings | result
        save_checkpoint(model, out / "policy", extra_meta=extra)
        result["out"] = str(out)
    return result
