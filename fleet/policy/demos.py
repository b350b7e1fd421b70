"""Teleoperator demonstrations for behaviour cloning: (observation, next 16 expert actions) pairs.

Collection runs the scripted expert (optionally with injected noise, so the data covers states a
slightly wrong policy visits) or a learner policy whose visited states the expert relabels
(DAgger). Every label is the expert's look-ahead chunk from that state, so chunks are consistent
with executing them open loop for `recompute_every` ticks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fleet.embodiments import get_embodiment
from fleet.sim import make_env

# a chunk policy for DAgger: (observation dict, embodiment name) -> (chunk_size, D) physical actions
ChunkPolicy = Callable[[list[dict], list[str]], list[np.ndarray]]


@dataclass
class DemoSet:
    """Demonstrations of one embodiment, as stacked arrays."""

    embodiment: str
    images: np.ndarray  # (N, 64, 64, 3) uint8
    proprio: np.ndarray  # (N, P) float32
    instructions: list[str] = field(default_factory=list)  # N strings
    actions: np.ndarray = None  # (N, chunk, D) float32, physical units
    successes: int = 0
    episodes: int = 0
    focus: np.ndarray | None = None  # (N, 2) float32 privileged image position of the named object

    def _focus_or_nan(self) -> np.ndarray:
        return self.focus if self.focus is not None else np.full((len(self), 2), np.nan, np.float32)

    def __len__(self) -> int:
        return len(self.instructions)

    def extend(self, other: DemoSet) -> DemoSet:
        if other.embodiment != self.embodiment:
            raise ValueError(f"cannot merge demos of {other.embodiment!r} into {self.embodiment!r}")
        return DemoSet(
            self.embodiment,
            np.concatenate([self.images, other.images]),
            np.concatenate([self.proprio, other.proprio]),
            self.instructions + other.instructions,
            np.concatenate([self.actions, other.actions]),
            self.successes + other.successes,
            self.episodes + other.episodes,
            np.concatenate([self._focus_or_nan(), other._focus_or_nan()]),
        )

    def subset(self, idx: np.ndarray) -> DemoSet:
        return DemoSet(
            self.embodiment,
            self.images[idx],
            self.proprio[idx],
            [self.instructions[i] for i in idx],
            self.actions[idx],
            focus=None if self.focus is None else self.focus[idx],
        )


def collect(
    name: str,
    episodes: int,
    seed: int = 0,
    shift=None,
    noise: float = 0.0,
    policy: ChunkPolicy | None = None,
    n_envs: int = 16,
    keep: float = 1.0,
) -> DemoSet:
    """Roll out `episodes` episodes and label every visited state with the expert's next chunk.

    noise: std of Gaussian noise (share of each dim's range) added to executed expert actions.
    policy: if given, its chunks drive the robot (recycled every `recompute_every` ticks, DAgger);
    the expert still labels. Episodes run `n_envs` at a time so a policy is queried in batches.
    keep: share of visited states kept (at random). Scenes matter more than states: the states of one
    episode share one scene, so many episodes with a few states each generalize better.
    """
    spec = get_embodiment(name)
    rng = np.random.default_rng(seed + 7919)
    span = np.asarray(spec.action_high, np.float32) - np.asarray(spec.action_low, np.float32)
    images, proprio, instructions, actions, focus = [], [], [], [], []
    successes = 0
    next_ep = 0
    envs: list = []
    while next_ep < episodes or envs:
        while len(envs) < n_envs and next_ep < episodes:
            env = make_env(name, shift=shift)
            obs, _ = env.reset(seed=seed * 100_003 + next_ep)
            envs.append({"env": env, "obs": obs, "chunk": None, "k": 0})
            next_ep += 1
        if policy is not None:
            need = [e for e in envs if e["chunk"] is None or e["k"] >= spec.recompute_every]
            if need:
                chunks = policy([e["obs"] for e in need], [name] * len(need))
                for e, c in zip(need, chunks, strict=True):
                    e["chunk"], e["k"] = np.asarray(c, np.float32), 0
        still = []
        for e in envs:
            env, obs = e["env"], e["obs"]
            kept = keep >= 1.0 or rng.random() < keep
            if kept:
                label = env.unwrapped.expert_chunk(spec.chunk_size)
                images.append(obs["image"])
                proprio.append(obs["proprio"])
                instructions.append(obs["instruction"])
                actions.append(label)
                focus.append(env.unwrapped.focus())
            if policy is not None:
                a = e["chunk"][e["k"]]
                e["k"] += 1
            else:
                first = label[0] if kept else env.unwrapped.expert_action()
                a = first + noise * span * rng.standard_normal(spec.action_dim).astype(np.float32)
            a = np.clip(a, spec.action_low, spec.action_high).astype(np.float32)
            obs, _, term, trunc, info = env.step(a)
            e["obs"] = obs
            if term or trunc:
                successes += int(info["is_success"])
            else:
                still.append(e)
        envs = still
    return DemoSet(
        name,
        np.stack(images),
        np.stack(proprio).astype(np.float32),
        instructions,
        np.stack(actions).astype(np.float32),
        successes,
        episodes,
        np.stack(focus).astype(np.float32),
    )
