"""What `fleet bench infer` measures with: the model and recorded frames, paired timing, action
differences against eager fp32, and closed-loop figures (success, chunk recycling, static frames).

fleet/bench/infer.py puts these together into the benchmark's rows (its docstring says what each means).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fleet.control import ActionBuffer
from fleet.embodiments import EMBODIMENTS, get_embodiment
from fleet.policy.default import DEFAULT_CHECKPOINT, load_policy
from fleet.policy.evaluate import evaluate
from fleet.policy.inference.backend import TorchBackend
from fleet.policy.train import build_model
from fleet.sim import make_env

FLOW_SAMPLES = 4  # flow-head robots ask for this many samples (RobotConfig's default)


# ----- model and data ---------------------------------------------------------------------------------------
def load_model(checkpoint=None, random_init: bool = False, log: Callable[[str], None] = print):
    """(model, description). Without a checkpoint: the shipped one, else (with a message) a randomly
    initialised model of the shipped size: speed does not depend on training, accuracy figures then do."""
    if not random_init:
        try:
            model, _ = load_policy(checkpoint)
            return model, {"source": str(checkpoint or DEFAULT_CHECKPOINT), "random_init": False}
        except FileNotFoundError as exc:
            if checkpoint is not None:
                raise
            log(
                f"note: {exc}; benchmarking a randomly initialised model of the shipped size instead "
                "(timings hold, action differences and success rates are not those of the trained policy)"
            )
    model = build_model(tuple(EMBODIMENTS)[:4], seed=0).eval()
    return model, {"source": "random-init (default_policy_config)", "random_init": True}


def observations(names: list[str], per_name: int, seed: int = 0) -> dict[str, list[dict]]:
    """per_name real frames per embodiment from expert episodes (a new episode every 6 steps)."""
    pools = {}
    for name in names:
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        pool = []
        for k in range(per_name):
            pool.append(obs)
            obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
            if term or trunc or k % 6 == 5:
                obs, _ = env.reset(seed=seed + k + 1)
        env.close()
        pools[name] = pool
    return pools


def make_batches(model, pools: dict[str, list[dict]], size: int) -> list[tuple]:
    """[(PolicyBatch, n_samples, robot ids)]: one per embodiment at size 1, else one mixed batch."""
    names = list(pools)

    def make(rows: list[tuple[str, int]]):
        obs = [pools[n][j % len(pools[n])] for n, j in rows]
        embs = [n for n, _ in rows]
        k = FLOW_SAMPLES if any(model.specs[n].head == "flow" for n in embs) else 1
        return model.collate(obs, embs), k, [f"robot-{n}-{j}" for n, j in rows]

    if size == 1:
        return [make([(n, 0)]) for n in names]
    return [make([(names[i % len(names)], i // len(names)) for i in range(size)])]


# ----- timing -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """How long to time: `repeats` alternating rounds of at least `min_s` seconds each."""

    repeats: int = 5
    min_s: float = 0.2

    def paired(self, base: Callable[[], object], tech: Callable[[], object]) -> tuple[float, float]:
        """Median ms per call of `base` and `tech`, timed in alternating rounds (order flipped every round)."""
        base(), tech()  # warm-up
        per_round = {}
        for fn in (base, tech):
            t0 = time.perf_counter()
            fn()
            per_round[fn] = max(1, min(50, int(self.min_s / max(time.perf_counter() - t0, 1e-6))))
        samples: dict = {base: [], tech: []}
        for r in range(self.repeats):
            for fn in (base, tech) if r % 2 == 0 else (tech, base):
                n = per_round[fn]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[fn].append((time.perf_counter() - t0) / n * 1e3)
        return statistics.median(samples[base]), statistics.median(samples[tech])


def over_batches(items: list, fn: Callable) -> Callable[[], None]:
    """A call that runs fn(*item) for every item."""

    def run() -> None:
        for item in items:
            fn(*item)

    return run


# ----- quality ----------------------------------------------------------------------------------------------
def action_diffs(model, rows: list[dict], ref: list[dict]) -> np.ndarray:
    """|chunk - reference chunk| of every row, step and dimension, as a share of the dimension's action range."""
    out = []
    for a, b in zip(rows, ref, strict=True):
        spec = model.specs[b["embodiment"]]
        span = np.asarray(spec.action_high, np.float64) - np.asarray(spec.action_low, np.float64)
        out.append((np.abs(np.asarray(a["chunk"], np.float64) - b["chunk"]) / span).ravel())
    return np.concatenate(out)


def action_diff(model, rows: list[dict], ref: list[dict]) -> float:
    """Largest |chunk - reference chunk| as a share of each dimension's action range."""
    return float(action_diffs(model, rows, ref).max())


def predict(backend, batch, k: int, seed: int = 0, **kwargs) -> list[dict]:
    """backend.predict with k samples from a generator seeded `seed` (the same noise for every backend)."""
    return backend.predict(batch, n_samples=k, generator=torch.Generator().manual_seed(seed), **kwargs)


# ----- closed loop ------------------------------------------------------------------------------------------
def backend_policy(backend, seed: int = 0):
    """A ChunkPolicy (observations, names) -> chunks over a backend; flow rows draw FLOW_SAMPLES from one
    seeded generator, so two backends see the same noise while their rollouts agree."""
    gen = torch.Generator().manual_seed(seed)
    model = backend.model

    def act(observations: list[dict], names: list[str]) -> list[np.ndarray]:
        k = FLOW_SAMPLES if any(model.specs[n].head == "flow" for n in names) else 1
        return [r["chunk"] for r in backend.predict(model.collate(observations, names), n_samples=k, generator=gen)]

    return act


def success(policy_for: Callable[[], Callable], names: list[str], episodes: int, recompute_every=None) -> dict:
    """{embodiment: success rate} over `episodes` unseen episodes each (a fresh policy per embodiment)."""
    return {n: evaluate(policy_for(), n, episodes, recompute_every=recompute_every).success_rate for n in names}


def recycling_ratio(model, names: list[str], ticks: int = 64, seed: int = 0) -> dict[str, float]:
    """Per embodiment: control ticks served per policy call (effective control rate / policy call rate),
    counted by the control layer's ActionBuffer over a closed loop of the fp32 policy."""
    act = backend_policy(TorchBackend(model), seed)
    out = {}
    for name in names:
        spec = get_embodiment(name)
        env = make_env(name)
        obs, _ = env.reset(seed=seed)
        buf = ActionBuffer(chunk_size=spec.chunk_size, recompute_every=spec.recompute_every)
        for tick in range(ticks):
            if buf.needs_refill(tick):
                buf.push(act([obs], [name])[0], tick)
            action = buf.pop(tick)
            obs, _, term, trunc, _ = env.step(np.clip(action, spec.action_low, spec.action_high))
            if term or trunc:
                obs, _ = env.reset(seed=seed + tick + 1)
        env.close()
        stats = buf.stats()
        out[name] = stats["actions_popped"] / max(1, stats["chunks_pushed"])
    return out


def static_frame_share(names: list[str], episodes: int = 2, seed: int = 0) -> dict[str, float]:
    """Per embodiment: share of policy calls (every recompute_every ticks of an expert episode) whose frame
    equals the previous call's: the encoder cache's hit rate for a moving robot."""
    out = {}
    for name in names:
        every = get_embodiment(name).recompute_every
        same = calls = 0
        env = make_env(name)
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            prev, t, done = None, 0, False
            while not done:
                if t % every == 0:
                    same += prev is not None and np.array_equal(prev, obs["image"])
                    calls += prev is not None
                    prev = obs["image"]
                obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
                t, done = t + 1, term or trunc
        env.close()
        out[name] = same / calls if calls else 0.0
    return out
