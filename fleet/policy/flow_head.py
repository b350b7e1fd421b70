"""Flow head (aloha, leap): rectified flow matching over the whole (T, D) normalized chunk.

x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) and x1 the chunk; the velocity net regresses x1 - x0.
Sampling integrates `n_euler` Euler steps from t=0 (noise) to t=1. K samples are K noises in one
batched call; the cross-attention K/V of the memory are computed once and reused by every step.
Rows may ask for their own K, and rows with a committed prefix are inpainted with ΠGDM guidance (rtc.py), or,
for a head trained for it (`PolicyConfig.rtc_trained`), clamped: the committed steps enter the velocity network
clean at flow time 1 (each step its own time) and are reset to the prefix at every Euler step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fleet.embodiments import EmbodimentSpec
from fleet.policy.backbone import PolicyConfig
from fleet.policy.heads import HeadBase
from fleet.policy.rtc import RTC_BETA, GroupPrefix, guidance_weight, prefix_weights


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
        """x: (N, T, D) at times t: (N,), or (N, T) one per chunk step -> velocity (N, T, D). The time
        embedding and the direct-path vector (N, 1, d) are added to every step token."""
        d = self.config.d_model
        if t.dim() == 1:
            time = self.time_mlp(sinusoidal(t, d))[:, None]
        else:
            time = self.time_mlp(sinusoidal(t.reshape(-1), d)).view(*t.shape, d)
        h = self.in_proj(x) + self.step_pos + time + direct
        for blk, kv in zip(self.blocks, kvs, strict=True):
            h = blk(h, kv, mask)
        return self.out(self.norm(h))

    def loss(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None,
        committed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching MSE for `actions` (B, T, D) normalized; noise and t drawn from `generator`.

        Each row gets `flow_train_noise` (noise, t) draws with t stratified over [0, 1): the regression
        target x1 - x0 is very noisy per draw, and extra draws reuse the row's memory K/V, so they
        cut gradient variance for the price of a head pass, not a backbone pass.

        committed (B,) int64 (training-time RTC): row i's first committed[i] steps are given, not predicted:
        they enter clean, at flow time 1, and the loss leaves them out.
        """
        b, n = actions.shape[0], self.config.flow_train_noise
        x1 = actions.repeat_interleave(n, 0)  # (B*n, T, D), row-major like memory_context(repeat=n)
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        u = torch.rand(b, n, generator=generator, dtype=x1.dtype, device=x1.device)
        t = ((torch.arange(n, dtype=x1.dtype, device=x1.device) + u) / n).reshape(-1)
        kvs, mask, direct = self.memory_context(memory, pad_mask, repeat=n)
        if committed is None:
            xt = (1.0 - t)[:, None, None] * x0 + t[:, None, None] * x1
            err = (self.velocity(xt, t, kvs, mask, direct) - (x1 - x0)).square()
            return (err * self.step_weights(err)[None, :, None]).mean(), {}
        given = _committed_mask(committed.to(x1.device).repeat_interleave(n), self.chunk_size)  # (B*n, T)
        tt = t[:, None].expand(-1, self.chunk_size).masked_fill(given, 1.0)
        xt = (1.0 - tt)[..., None] * x0 + tt[..., None] * x1
        err = (self.velocity(xt, tt, kvs, mask, direct) - (x1 - x0)).square()
        keep = (~given).to(err.dtype)[..., None] * self.step_weights(err)[None, :, None]
        return (err * keep).sum() / (keep.sum() * err.shape[-1]).clamp_min(1.0), {}

    def _integrate(self, x: torch.Tensor, kvs, mask, direct, steps: int) -> torch.Tensor:
        """Euler steps from noise x (N, T, D) at t=0 to t=1."""
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full((x.shape[0],), i * dt, dtype=x.dtype, device=x.device)
            x = x + dt * self.velocity(x, t, kvs, mask, direct)
        return x

    def _integrate_guided(
        self, x: torch.Tensor, kvs, mask, direct, steps: int, target: torch.Tensor, weights: torch.Tensor, beta: float
    ) -> torch.Tensor:
        """Euler steps with ΠGDM guidance toward target (N, T, D) under per-step weights (N, T) (rtc.py).

        Each step: the denoised estimate x1 = x + (1 - t) v(x, t); the weighted error e = W (target - x1);
        g = e^T dx1/dx, one vector-Jacobian product through the velocity network (only the input's gradient
        is computed, none for the weights); the step uses v + min(beta, (1-t)/(t r_t^2)) g.
        """
        # the caller may run under inference_mode, whose tensors cannot be saved for backward: copy the few
        # per-chunk constants out of it (the memory K/V, the mask and the direct vector)
        with torch.inference_mode(False), torch.enable_grad():
            kvs = [(k.clone(), v.clone()) for k, v in kvs]
            mask = None if mask is None else mask.clone()
            direct = direct.clone() if isinstance(direct, torch.Tensor) else direct
            x, target, w = x.clone(), target.clone(), weights[..., None].clone()
            dt = 1.0 / steps
            for i in range(steps):
                t = i * dt
                xg = x.detach().requires_grad_(True)
                v = self.velocity(xg, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), kvs, mask, direct)
                x1 = xg + (1.0 - t) * v
                (g,) = torch.autograd.grad(x1, xg, grad_outputs=(target - x1.detach()) * w)
                x = x.detach() + dt * (v.detach() + guidance_weight(t, beta) * g)
            return x.detach()

    def _integrate_clamped(
        self, x: torch.Tensor, kvs, mask, direct, steps: int, target: torch.Tensor, delay: torch.Tensor
    ) -> torch.Tensor:
        """Euler steps from noise with each row's first delay[i] steps held at target (N, T, D), fed at flow time
        1 (training-time RTC: the head learned to continue steps given this way)."""
        given = _committed_mask(delay.to(x.device), self.chunk_size)[..., None]  # (N, T, 1)
        dt = 1.0 / steps
        for i in range(steps):
            x = torch.where(given, target, x)
            t = torch.full(given.shape[:2], i * dt, dtype=x.dtype, device=x.device).masked_fill(given[..., 0], 1.0)
            x = x + dt * self.velocity(x, t, kvs, mask, direct)
        return torch.where(given, target, x)

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
        x = self._integrate(x, kvs, mask, direct, steps)
        return x.view(b, k, self.chunk_size, self.action_dim)

    def sample_rows(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        row_samples: torch.Tensor,
        generator: torch.Generator | None = None,
        prefix: GroupPrefix | None = None,
        n_steps: int | None = None,
        beta: float = RTC_BETA,
    ) -> torch.Tensor:
        """memory (B, S, d), row_samples (B,) int64 K_i -> samples (sum K_i, T, D) normalized, row 0's first.

        One noise draw for all rows (as `sample`: with equal K_i the same noise, in the same order). Rows with
        a prefix are integrated with guidance toward it (clamped to its committed steps for a head in
        `PolicyConfig.rtc_trained`), the others exactly as `sample` integrates them (on
        their own rows, so a request without a prefix never pays for the guidance of its batch mates)."""
        steps = n_steps or self.config.n_euler
        ks = row_samples.long()
        uniform = bool((ks == ks[0]).all())
        kvs, mask, direct = self.memory_context(memory, pad_mask, repeat=int(ks[0]) if uniform else ks)
        shape = (int(ks.sum()), self.chunk_size, self.action_dim)
        x = torch.randn(shape, generator=generator, dtype=memory.dtype, device=memory.device)
        if prefix is None or not prefix.any():
            return self._integrate(x, kvs, mask, direct, steps)
        guided = prefix.rows.repeat_interleave(ks)
        out = torch.empty_like(x)
        plain_idx, guided_idx = (~guided).nonzero()[:, 0], guided.nonzero()[:, 0]
        if plain_idx.numel():
            out[plain_idx] = self._integrate(x[plain_idx], *_take(kvs, mask, direct, plain_idx), steps)
        target = prefix.target.repeat_interleave(ks, 0)[guided_idx]
        context = _take(kvs, mask, direct, guided_idx)
        if self.name in self.config.rtc_trained:
            delay = prefix.delay.repeat_interleave(ks, 0)[guided_idx]
            out[guided_idx] = self._integrate_clamped(x[guided_idx], *context, steps, target, delay)
            return out
        weights = prefix_weights(prefix.length, prefix.delay, self.chunk_size).repeat_interleave(ks, 0)[guided_idx]
        out[guided_idx] = self._integrate_guided(x[guided_idx], *context, steps, target, weights, beta)
        return out

    def _execute(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, K, T, D) -> (B, T, D): the chunk a robot executes (see predict)."""
        return samples[:, 0] if self.name in self.config.flow_execute_sample else samples.mean(dim=1)

    def predict(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        n_samples: int,
        temperature: float,
        generator: torch.Generator | None,
        row_samples: list[int] | None = None,
        prefix: GroupPrefix | None = None,
    ) -> dict[str, torch.Tensor]:
        """-> chunk (B, T, D) normalized and samples (B, K, T, D).

        The executed chunk is the mean of the K samples, clipped to [-1, 1]: averaging cancels the
        sampling noise (an ensemble's answer), while the spread of the samples is the confidence
        signal. For embodiments in `PolicyConfig.flow_execute_sample` it is the first sample instead:
        when the samples disagree on timing (close the hand now or a step later) their mean is a slower
        motion than any of them. With K=1 it is the single sample. `temperature` is unused.

        row_samples (K_i per row) and/or prefix (real-time chunking): samples is (B, max K_i, T, D), row i's
        K_i samples first and NaN after, and `row_samples` (B,) int64 says how many are real; each row's
        chunk comes from its own samples only.
        """
        if row_samples is None and prefix is None:
            samples = self.sample(memory, pad_mask, n_samples, generator)
            return {"chunk": self._execute(samples).clamp(-1.0, 1.0), "samples": samples}
        b = memory.shape[0]
        ks = torch.tensor(row_samples if row_samples is not None else [n_samples] * b, dtype=torch.long)
        if ks.numel() != b or bool((ks < 1).any()):
            raise ValueError(f"row_samples: expected {b} ints >= 1, got {ks.tolist()}")
        flat = self.sample_rows(memory, pad_mask, ks, generator, prefix)
        if bool((ks == ks[0]).all()):
            samples = flat.view(b, int(ks[0]), self.chunk_size, self.action_dim)
            chunk = self._execute(samples)
        else:
            samples = flat.new_full((b, int(ks.max()), self.chunk_size, self.action_dim), float("nan"))
            parts = torch.split(flat, ks.tolist())
            for i, part in enumerate(parts):
                samples[i, : part.shape[0]] = part
            chunk = torch.stack([self._execute(p[None])[0] for p in parts])
        return {"chunk": chunk.clamp(-1.0, 1.0), "samples": samples, "row_samples": ks}


def _committed_mask(committed: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) int64 committed steps per row -> (N, T) bool, True on each row's first committed[i] steps."""
    return torch.arange(chunk_size, device=committed.device)[None] < committed[:, None]


def _take(kvs, mask, direct, idx: torch.Tensor) -> tuple:
    """The per-sample-row memory context (K/V, mask, direct vector) of rows `idx`."""
    kvs = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kvs]
    mask = None if mask is None else mask.index_select(0, idx)
    direct = direct.index_select(0, idx) if isinstance(direct, torch.Tensor) else direct
    return kvs, mask, direct
