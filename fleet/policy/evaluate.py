"""Closed-loop evaluation of a chunk policy in the simulators, with chunk recycling and the safety layer.

`fleet eval` calls `evaluate`; pretraining (DAgger) and the experiments reuse `rollout`. Episodes
run `n_envs` at a time so the policy is asked in batches, as the fleet's server would be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fleet.control import ActionBuffer, SafetyLayer
from fleet.embodiments import get_embodiment
from fleet.sim import make_env

# (observations, embodiment names) -> chunks (chunk_size, D) in physical units
ChunkPolicy = Callable[[list[dict], list[str]], list[np.ndarray]]

EVAL_SEED_BASE = 1_000_000_007  # far from every training seed, so evaluation scenes are unseen


@dataclass
class EvalResult:
    embodiment: str
    shift: str | None
    episodes: int
    success_rate: float
    mean_steps: float
    successes: list[bool]
    policy_calls: int = 0
    safety_modified: int = 0
    estop_trips: int = 0  # episodes whose contact force tripped the e-stop (they fail)

    def to_dict(self) -> dict:
        return {
            "embodiment": self.embodiment,
            "shift": self.shift,
            "episodes": self.episodes,
            "success_rate": self.success_rate,
            "estop_trips": self.estop_trips,
            "mean_steps": self.mean_steps,
        }


def evaluate(
    policy: ChunkPolicy,
    name: str,
    episodes: int,
    shift: str | None = None,
    seed: int = 0,
    n_envs: int = 16,
    recompute_every: int | None = None,
    use_safety: bool = True,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Success rate of `policy` on `episodes` unseen episodes of embodiment `name`.

    The robot executes each chunk's first `recompute_every` actions (default: the spec's), then asks
    again; every action goes through a `SafetyLayer`, as on a real robot: its position walls see the
    proprio, and the contact force of each step can trip its e-stop, which holds the robot for the rest of the
    episode (so the episode fails).
    """
    spec = get_embodiment(name)
    every = recompute_every or spec.recompute_every
    successes: list[bool] = []
    steps: list[int] = []
    calls = modified = trips = 0
    next_ep = 0
    envs: list[dict] = []
    while next_ep < episodes or envs:
        while len(envs) < n_envs and next_ep < episodes:
            env = make_env(name, shift=shift)
            obs, _ = env.reset(seed=EVAL_SEED_BASE + seed * 100_003 + next_ep)
            envs.append(
                {
                    "env": env,
                    "obs": obs,
                    "buf": ActionBuffer(chunk_size=spec.chunk_size, recompute_every=every),
                    "safety": SafetyLayer(spec) if use_safety else None,
                    "tick": 0,
                    "force": 0.0,  # the contact force the last step measured: the safety layer's e-stop reads it
                }
            )
            next_ep += 1
        need = [e for e in envs if e["buf"].needs_refill(e["tick"])]
        if need:
            chunks = policy([e["obs"] for e in need], [name] * len(need))
            calls += 1
            for e, c in zip(need, chunks, strict=True):
                e["buf"].push(np.asarray(c, np.float32), e["tick"])
        still = []
        for e in envs:
            a = e["buf"].pop(e["tick"])
            if a is None:  # cannot happen with zero latency, but never move on nothing
                a = np.zeros(spec.action_dim, np.float32)
            if e["safety"] is not None:
                a, report = e["safety"](a, force=e["force"], proprio=e["obs"]["proprio"])
                modified += int(report.modified)
            a = np.clip(np.asarray(a, np.float32), spec.action_low, spec.action_high)
            obs, _, term, trunc, info = e["env"].step(a)
            e["obs"], e["force"] = obs, float(info.get("force", 0.0))
            e["tick"] += 1
            if term or trunc:
                successes.append(bool(info["is_success"]))
                trips += int(e["safety"] is not None and e["safety"].estopped)
                steps.append(e["tick"])
                if progress is not None:
                    progress(1)
            else:
                still.append(e)
        envs = still
    return EvalResult(
        name,
        shift,
        episodes,
        float(np.mean(successes)) if successes else 0.0,
        float(np.mean(steps)) if steps else 0.0,
        successes,
        calls,
        modified,
        trips,
    )
