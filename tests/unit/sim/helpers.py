"""What the sim tests share: the shift cases and two ways to drive an env."""

from __future__ import annotations

import numpy as np

from fleet.sim import SHIFTS

ALL_SHIFTS = "+".join(SHIFTS)
SHIFT_CASES = [*SHIFTS, ALL_SHIFTS]
SHIFT_IDS = [*SHIFTS, "all"]


def random_actions(env, n: int, seed: int) -> list[np.ndarray]:
    """n uniformly random actions inside the env's action box."""
    u = env.unwrapped
    rng = np.random.default_rng(seed)
    return [(u._low + (u._high - u._low) * rng.random(u._low.shape)).astype(np.float32) for _ in range(n)]


def expert_steps(env, k: int) -> None:
    """k steps of the privileged expert."""
    for _ in range(k):
        env.step(env.unwrapped.expert_action())
