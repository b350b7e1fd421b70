"""Token head (franka, hello): per-dimension bins, the chunk decoded autoregressively step by step.

Step t's input is the sum of per-dimension embeddings of step t-1's chosen bins (a learned BOS at
t=0) plus a step position embedding; within a step the dimensions are predicted independently
given the prefix. Training is one teacher-forced causal pass; decoding keeps a KV cache, and a request's
committed prefix (real-time chunking, rtc.py) is teacher-forced through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fleet.embodiments import EmbodimentSpec
from fleet.policy.backbone import KVCache, PolicyConfig
from fleet.policy.heads import HeadBase
from fleet.policy.rtc import GroupPrefix


@dataclass
class TokenDecoding:
    """One decoded chunk per row. All (B, T, D) unless noted."""

    bins: torch.Tensor  # int64 chosen bin per step and dimension
    actions: torch.Tensor  # float32 normalized: the chosen bins' centers
    logits: torch.Tensor  # (B, T, D, n_bins)
    entropy: torch.Tensor  # nats, of the untempered distribution (the model's own uncertainty)
    probs: torch.Tensor  # untempered probability of each chosen bin


class TokenHead(HeadBase):
    kind = "token"

    def __init__(self, spec: EmbodimentSpec, config: PolicyConfig) -> None:
        super().__init__(spec, config)
        d, nb, dims = config.d_model, config.n_bins, spec.action_dim
        self.n_bins = nb
        # one table for all dims: dim j's bin b is row j * n_bins + b
        self.bin_embed = nn.Embedding(dims * nb, d)
        nn.init.normal_(self.bin_embed.weight, std=0.02)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.out = nn.Linear(d, dims * nb)
        self.register_buffer("offsets", torch.arange(dims) * nb, persistent=False)
        self.register_buffer("centers", -1.0 + (torch.arange(nb, dtype=torch.float32) + 0.5) * (2.0 / nb), False)

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """(..., D) normalized in [-1, 1] -> (..., D) int64 bins (values outside are clamped)."""
        return ((actions + 1.0) * (self.n_bins / 2.0)).floor().long().clamp_(0, self.n_bins - 1)

    def _embed_bins(self, bins: torch.Tensor) -> torch.Tensor:
        """(B, t, D) bins -> (B, t, d): sum over dimensions of their bin embeddings."""
        return self.bin_embed(bins + self.offsets).sum(dim=-2)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, t, d) -> (B, t, D, n_bins)."""
        b, t, _ = h.shape
        return self.out(self.norm(h)).view(b, t, self.action_dim, self.n_bins)

    def teacher_forced_logits(self, memory: torch.Tensor, pad_mask: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """bins: (B, T, D) targets -> logits (B, T, D, n_bins), all steps in one causal pass."""
        kvs, mask, direct = self.memory_context(memory, pad_mask)
        b = bins.shape[0]
        x = torch.cat([self.bos.expand(b, 1, -1), self._embed_bins(bins[:, :-1])], dim=1) + self.step_pos + direct
        for blk, kv in zip(self.blocks, kvs, strict=True):
            x = blk(x, kv, mask, causal=True)
        return self._logits(x)

    def loss(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None,
        committed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of the target bins of `actions` (B, T, D) normalized. committed (B,) int64
        (training-time RTC): row i's first committed[i] steps are given (teacher-forced as decoding forces a
        prefix), not predicted, so the loss leaves them out."""
        bins = self.to_bins(actions)
        logits = self.teacher_forced_logits(memory, pad_mask, bins)
        ce = F.cross_entropy(logits.reshape(-1, self.n_bins), bins.reshape(-1), reduction="none")
        weighted = ce.reshape(bins.shape) * self.step_weights(ce)[None, :, None]
        if committed is None:
            loss = weighted.mean()
        else:
            steps = torch.arange(self.chunk_size, device=bins.device)[None]
            keep = (steps >= committed.to(bins.device)[:, None]).to(weighted.dtype)[..., None]
            loss = (weighted * keep).sum() / (keep.sum() * weighted.shape[-1]).clamp_min(1.0)
        hit = logits.detach().argmax(-1) == bins
        return loss, {"bin_accuracy": hit.float().mean().item(), "first_step_accuracy": hit[:, 0].float().mean().item()}

    def _choose(self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        """(B, D, n_bins) -> (B, D) bins: argmax at temperature 0, else a sample of softmax(logits / T)."""
        if temperature <= 0.0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1).reshape(-1, self.n_bins)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])

    def decode(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        prefix: GroupPrefix | None = None,
    ) -> TokenDecoding:
        """Decode a chunk for each row of memory (B, S, d).

        use_cache=False recomputes the whole prefix every step: O(T^2) work, kept as the reference
        the cached path is tested against and as the benchmark's baseline.

        prefix (real-time chunking): a row's first `delay` steps are teacher-forced to its prefix's bins,
        which then feed the KV cache as the next steps' inputs, so what follows is decoded conditioned on
        exactly what will execute. The logits, entropy and probs of a forced step are the model's own
        (the probability it gave the forced bin). Rows without a prefix decode exactly as without one.
        """
        b, steps = memory.shape[0], self.chunk_size
        forced_bins = forced = None
        if prefix is not None and prefix.any():
            forced_bins = self.to_bins(prefix.target.to(memory.device))
            forced = torch.arange(steps, device=memory.device)[None] < prefix.delay.to(memory.device)[:, None]
        kvs, mask, direct = self.memory_context(memory, pad_mask)
        caches = [KVCache(b, blk.n_heads, steps, self.config.d_model // blk.n_heads, memory) for blk in self.blocks]
        inputs: list[torch.Tensor] = []
        bins, logits = [], []
        x = self.bos.expand(b, 1, -1)
        for t in range(steps):
            inputs.append(x + self.step_pos[t] + direct)
            if use_cache:
                h = inputs[-1]
                for blk, kv, cache in zip(self.blocks, kvs, caches, strict=True):
                    h = blk(h, kv, mask, cache=cache)
            else:
                h = torch.cat(inputs, dim=1)
                for blk, kv in zip(self.blocks, kvs, strict=True):
                    h = blk(h, kv, mask, causal=True)
                h = h[:, -1:]
            step_logits = self._logits(h)[:, 0]  # (B, D, n_bins)
            chosen = self._choose(step_logits, temperature, generator)
            if forced is not None:
                chosen = torch.where(forced[:, t, None], forced_bins[:, t], chosen)
            logits.append(step_logits)
            bins.append(chosen)
            x = self._embed_bins(chosen[:, None])
        all_bins, all_logits = torch.stack(bins, 1), torch.stack(logits, 1)
        logp = torch.log_softmax(all_logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        probs = logp.gather(-1, all_bins[..., None])[..., 0].exp()
        return TokenDecoding(all_bins, self.centers[all_bins], all_logits, entropy, probs)

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
        """-> chunk (B, T, D) normalized, entropy (B, T, D) nats, probs (B, T, D). n_samples and row_samples
        are ignored: a token head's confidence is its entropy, which one decoding pass yields. prefix: the
        committed steps are teacher-forced (decode)."""
        out = self.decode(memory, pad_mask, temperature, generator, prefix=prefix)
        return {"chunk": out.actions, "entropy": out.entropy, "probs": out.probs}
