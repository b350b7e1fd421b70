"""The scripted "human": a teleoperator who watches the policy's proposals and corrects them.

It compares the actions about to run with what the privileged expert would do next, and overrides
when they stray beyond a tolerance or when the robot asks for help. The correction is a full
chunk (chunk_size, D) looked ahead on a copy of the simulator, so the env itself is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleet.sim.base import FleetEnv


@dataclass(frozen=True)
class TeleopConfig:
    tolerance: float = 0.15
    # override when the proposal's mean per-step deviation (max over dims, as a share of each
    # dimension's range) from the expert exceeds this
    compare_steps: int = 4
    # how many of the proposed actions the human judges: the ones that will run before the next chunk

    def __post_init__(self) -> None:
        if not 0.0 < self.tolerance <= 1.0:
            raise ValueError(f"TeleopConfig.tolerance must be in (0, 1], got {self.tolerance}")
        if self.compare_steps < 1:
            raise ValueError(f"TeleopConfig.compare_steps must be >= 1, got {self.compare_steps}")


@dataclass
class TeleopDecision:
    override: bool
    # True when the human took over for this chunk
    chunk: np.ndarray
    # (chunk_size, D) float32: the corrected chunk if override, else the policy's own
    reason: str
    # "stray" (proposal deviated), "help" (robot asked), or "ok"
    deviation: float
    # the measured deviation (share of range) of the proposal from the expert


class Teleoperator:
    """Scripted human corrector: `judge` compares a proposal with a demonstration (the robot stack passes the
    task's `demonstrate`, so it never reaches into a simulator); `review` does both for a FleetEnv."""

    def __init__(self, config: TeleopConfig | None = None):
        self.config = config or TeleopConfig()
        self.overrides = 0
        self.reviews = 0

    def demonstrate(self, env) -> np.ndarray:
        """What the human would command for the next chunk: (chunk_size, D) float32."""
        return _unwrap(env).expert_chunk()

    def deviation(self, env, policy_chunk: np.ndarray, expert: np.ndarray | None = None) -> float:
        u = _unwrap(env)
        expert = u.expert_chunk() if expert is None else expert
        policy_chunk = np.asarray(policy_chunk, dtype=np.float32)
        if policy_chunk.shape != expert.shape:
            raise ValueError(f"policy_chunk: expected shape {expert.shape}, got {policy_chunk.shape}")
        k = min(self.config.compare_steps, len(expert))
        span = u._high - u._low
        diff = np.abs(policy_chunk[:k] - expert[:k]) / span
        return float(np.nan_to_num(diff, nan=1.0).max(axis=1).mean())

    def review(self, env, policy_chunk: np.ndarray, asked_for_help: bool = False) -> TeleopDecision:
        """Judge one proposed chunk against a fleet simulator's expert (see `judge`)."""
        u = _unwrap(env)
        return self.judge(u.expert_chunk(len(policy_chunk)), policy_chunk, u._high - u._low, asked_for_help)

    def judge(
        self, expert: np.ndarray, policy_chunk: np.ndarray, span: np.ndarray, asked_for_help: bool = False
    ) -> TeleopDecision:
        """Judge one proposed chunk (T, D) against what the demonstrator would do (`expert` (T, D), from the
        task's `demonstrate`; `span` (D,) = action_high - action_low); return the chunk to execute."""
        self.reviews += 1
        expert = np.asarray(expert, dtype=np.float32)
        policy_chunk = np.asarray(policy_chunk, dtype=np.float32)
        if policy_chunk.shape != expert.shape:
            raise ValueError(f"policy_chunk: expected shape {expert.shape}, got {policy_chunk.shape}")
        k = min(self.config.compare_steps, len(expert))
        diff = np.abs(policy_chunk[:k] - expert[:k]) / np.asarray(span, np.float32)
        dev = float(np.nan_to_num(diff, nan=1.0).max(axis=1).mean())
        if asked_for_help or dev > self.config.tolerance:
            self.overrides += 1
            return TeleopDecision(True, expert, "help" if asked_for_help else "stray", dev)
        return TeleopDecision(False, policy_chunk, "ok", dev)


def _unwrap(env) -> FleetEnv:
    u = getattr(env, "unwrapped", env)
    if not isinstance(u, FleetEnv):
        raise TypeError(f"Teleoperator needs a fleet simulator, got {type(u).__name__}")
    return u
