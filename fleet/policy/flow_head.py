"""Flow head (aloha, leap): rectified flow matching over the whole (T, D) normalized chunk.

x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) and x1 the chunk; the velocity net regresses x1 - x0.
Sampling integrates `n_euler` Euler steps from t=0 (noise) to t=1. K samples are K noises in one
batched call; the cross-attention K/V of the memory are computed once and reused by every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fleet.embodiments import EmbodimentSpec
from fleet.policy.backbone import PolicyConfig
from fleet.policy.heads import HeadBase


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: (N,) in [0, 1] -> (N, dim) sin/cos features over frequencies 1 .. 1000 (in units of t * 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t[:, None] * 1000.0) * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class FlowHead(HeadBase):
    kind = "flow"

    def __init__(self, spec: EmbodimentSpec, config: PolicyConfig) -> None:
        super().__init__(spec, config)
        d = config.d_model
        self.in_proj = nn.Linear(spec.action_dim, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.out = nn.Linear(d, spec.action_dim)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        kvs: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor | None,
        direct: torch.Tensor | float = 0.0,
    ) -> torch.Tensor:
        """x: (N, T, D) at times t: (N,) -> velocity (N, T, D). The time embedding and the direct-path
        vector (N, 1, d) are added to every step token."""
        h = self.in_proj(x) + self.step_pos + self.time_mlp(sinusoidal(t, self.config.d_model))[:, None] + direct
        for blk, kv in zip(self.blocks, kvs, strict=True):
            h = blk(h, kv, mask)
        return self.out(self.norm(h))

    def loss(
        self, memory: torch.Tensor, pad_mask: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching MSE for `actions` (B, T, D) normalized; noise and t drawn from `generator`.

        Each row gets `flow_train_noise` (noise, t) draws with t stratified over [0, 1): the regression
        target x1 - x0 is very noisy per draw, and extra draws reuse the row's memory K/V, so they
        cut gradient variance for the price of a head pass, not a backbone pass.
        """
        b, n = actions.shape[0], self.config.flow_train_noise
        x1 = actions.repeat_interleave(n, 0)  # (B*n, T, D), row-major like memory_context(repeat=n)
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        u = torch.rand(b, n, generator=generator, dtype=x1.dtype, device=x1.device)
        t = ((torch.arange(n, dtype=x1.dtype, device=x1.device) + u) / n).reshape(-1)
        xt = (1.0 - t)[:, None, None] * x0 + t[:, None, None] * x1
        kvs, mask, direct = self.memory_context(memory, pad_mask, repeat=n)
        err = (self.velocity(xt, t, kvs, mask, direct) - (x1 - x0)).square()
        loss = (err * self.step_weights(err)[None, :, None]).mean()
        return loss, {}

    def sample(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        n_steps: int | None = None,
    ) -> torch.Tensor:
        """memory (B, S, d) -> samples (B, K, T, D) normalized (unclipped), from K noises per row in one batch."""
        b, k = memory.shape[0], n_samples
        steps = n_steps or self.config.n_euler
        kvs, mask, direct = self.memory_context(memory, pad_mask, repeat=k)
        shape = (b * k, self.chunk_size, self.action_dim)
        x = torch.randn(shape, generator=generator, dtype=memory.dtype, device=memory.device)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((b * k,), i * dt, dtype=memory.dtype, device=memory.device)
            x = x + dt * self.velocity(x, t, kvs, mask, direct)
        return x.view(b, k, self.chunk_size, self.action_dim)

    def predict(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        n_samples: int,
        temperature: float,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """-> chunk (B, T, D) normalized and samples (B, K, T, D).

        The executed chunk is the mean of the K samples, clipped to [-1, 1]: averaging cancels the
        sampling noise (an ensemble's answer), while the spread of the samples is the confidence
        signal. For embodiments in `PolicyConfig.flow_execute_sample` it is the first sample instead:
        when the samples disagree on timing (close the hand now or a step later) their mean is a slower
        motion than any of them. With K=1 it is the single sample. `temperature` is unused.
        """
        samples = self.sample(memory, pad_mask, n_samples, generator)
        chunk = samples[:, 0] if self.name in self.config.flow_execute_sample else samples.mean(dim=1)
        return {"chunk": chunk.clamp(-1.0, 1.0), "samples": samples}
