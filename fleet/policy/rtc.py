"""Real-time chunking (RTC): what a request's committed prefix turns into inside the heads.

A robot that asks for its next chunk keeps executing its current plan while the server thinks: the
first `delay` actions of the new chunk are already decided (they are the old plan's), and the old plan
goes on for a few ticks more. The request carries that plan (`prefix`, n actions from the request's
observation tick on) and how many of them are committed (`delay` <= n). The heads then make the new chunk
continue it instead of starting afresh (Black, Galliker, Levine 2025, "Real-Time Execution of Action
Chunking Flow Policies", arXiv 2506.07339):

- flow heads inpaint with ΠGDM guidance: each Euler step takes a vector-Jacobian product through the
  velocity network that pulls the denoised estimate toward the prefix, weighted per step by
  `prefix_weights` (1 on the committed steps, decaying to 0 where the old plan ends) and scaled by
  `guidance_weight` (clipped at `beta`);
- token heads teacher-force the committed steps' bins through the KV cache, so the decoded continuation
  is conditioned on exactly what will execute.

Rows without a prefix are untouched by either. `GroupPrefix` is one embodiment group's prefixes as
tensors, built by `PolicyBatch.head_options` (batch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RTC_BETA = 5.0
# the clip on the guidance weight (the paper's beta): the weight (1-t)/(t r_t^2) is infinite at t = 0 and
# past ~5 the first Euler steps overshoot the prefix instead of converging on it


@dataclass
class GroupPrefix:
    """The prefixes of one head's rows (B rows of the group; rows without a prefix have length 0)."""

    target: torch.Tensor  # (B, T, D) float32 normalized actions, zero past each row's length
    length: torch.Tensor  # (B,) int64 n: how many steps of the old plan the row sent (0 = no prefix)
    delay: torch.Tensor  # (B,) int64 d <= n: the committed steps (they execute before the reply arrives)

    @property
    def rows(self) -> torch.Tensor:
        """(B,) bool: which rows carry a prefix."""
        return self.length > 0

    def any(self) -> bool:
        return bool(self.rows.any())

    def select(self, idx: torch.Tensor) -> GroupPrefix:
        return GroupPrefix(self.target.index_select(0, idx), self.length.index_select(0, idx), self.delay[idx])


def prefix_weights(length: torch.Tensor, delay: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B,) n, (B,) d -> (B, T) guidance weights over chunk steps.

    1 for steps i < d (committed), c (e^c - 1) / (e - 1) with c = 1 - (i - d) / (n - d + 1) for d <= i < n
    (the old plan, trusted less the further it reaches), 0 from n on (the paper's soft mask, with n = H - s
    the end of the old plan)."""
    i = torch.arange(chunk_size, dtype=torch.float32)[None]
    n, d = length.float()[:, None], delay.float()[:, None]
    c = 1.0 - (i - d) / (n - d + 1.0)
    soft = c * (torch.exp(c) - 1.0) / (math.e - 1.0)
    w = torch.where(i < d, torch.ones_like(soft), torch.where(i < n, soft, torch.zeros_like(soft)))
    return w.clamp_(0.0, 1.0)


def guidance_weight(t: float, beta: float = RTC_BETA) -> float:
    """ΠGDM's weight at flow time t in [0, 1): min(beta, (1 - t) / (t r_t^2)), r_t^2 = (1-t)^2 / (t^2 + (1-t)^2)."""
    if t <= 0.0:
        return beta
    r2 = (1.0 - t) ** 2 / (t**2 + (1.0 - t) ** 2)
    return min(beta, (1.0 - t) / (t * r2))
