"""What every action head shares: the embodiment's proprio stem and the decoder block.

A head is everything one embodiment owns and adaptation may change: its proprio stem (proprio ->
the backbone's proprio token), its decoder and its output layer. The backbone stays frozen, so a
head's state dict is a complete, separately versioned unit (checkpoint.save_head / head_to_bytes).
`TokenHead` (token_head.py) and `FlowHead` (flow_head.py) implement `loss` and `predict`; `make_head`
(model.py) picks the one a spec asks for.
"""

from __future__ import annotations

import torch
from torch import nn

from fleet.embodiments import EmbodimentSpec
from fleet.policy.backbone import MLP, CrossAttention, KVCache, PolicyConfig, SelfAttention, attend_mask
from fleet.policy.rtc import GroupPrefix


class ProprioStem(nn.Module):
    """proprio (B, P) float32 -> one token (B, d). Standardized first with per-dim statistics that
    training sets from data (`set_stats`); they are buffers, so they travel with the head."""

    def __init__(self, proprio_dim: int, d: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(proprio_dim))
        self.register_buffer("std", torch.ones(proprio_dim))
        self.proj = nn.Linear(proprio_dim, d)

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"proprio stats: expected shape {tuple(self.mean.shape)}, got {tuple(mean.shape)}")
        with torch.no_grad():
            self.mean.copy_(mean)
            self.std.copy_(std.clamp_min(1e-3))  # constant dims (a flag that never flips) must not blow up

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.proj((proprio - self.mean) / self.std)


class DecoderBlock(nn.Module):
    """Pre-LN: self-attention (causal + KV cache for token heads, full for flow heads), cross-attention
    to backbone memory (its K/V precomputed once per chunk by `memory_kv`), MLP."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.self_attn = nn.LayerNorm(d), SelfAttention(d, n_heads, dropout)
        self.ln2, self.cross_attn = nn.LayerNorm(d), CrossAttention(d, n_heads, dropout)
        self.ln3, self.mlp = nn.LayerNorm(d), MLP(d, mlp_ratio, dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.memory_kv(memory)

    def forward(
        self,
        x: torch.Tensor,
        mem_kv: tuple[torch.Tensor, torch.Tensor],
        mem_mask: torch.Tensor | None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); mem_mask: (B, 1, 1, S) True=attend or None."""
        x = x + self.self_attn(self.ln1(x), causal=causal, cache=cache)
        x = x + self.cross_attn(self.ln2(x), mem_kv, mem_mask)
        return x + self.mlp(self.ln3(x))


class HeadBase(nn.Module):
    """Shared parts of an action head. Subclasses implement `loss` and `predict` on a group's memory."""

    kind: str = ""

    def __init__(self, spec: EmbodimentSpec, config: PolicyConfig) -> None:
        super().__init__()
        if spec.chunk_size != config.chunk_size:
            raise ValueError(
                f"embodiment {spec.name!r}: chunk_size {spec.chunk_size} != PolicyConfig.chunk_size {config.chunk_size}"
            )
        d = config.d_model
        self.name, self.action_dim, self.chunk_size = spec.name, spec.action_dim, config.chunk_size
        self.config = config
        self.stem = ProprioStem(spec.proprio_dim, d)
        self.step_pos = nn.Parameter(torch.randn(config.chunk_size, d) * 0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(d, config.head_heads, config.head_mlp_ratio, config.dropout) for _ in range(config.head_layers)
        )
        self.norm = nn.LayerNorm(d)
        # the direct path: [embodiment, proprio, keypoint tokens] of the memory -> one vector per row
        self.n_direct = 2 + (config.keypoints + 4 if config.keypoints else 0)
        self.direct = (
            nn.Sequential(nn.Linear(self.n_direct * d, d), nn.GELU(), nn.Linear(d, d)) if config.head_direct else None
        )

    def step_weights(self, like: torch.Tensor) -> torch.Tensor:
        """(T,) loss weights over chunk steps, summing to T: full weight on the executed head of the chunk."""
        w = torch.full((self.chunk_size,), float(self.config.loss_tail_weight), dtype=like.dtype)
        w[: self.config.loss_head_steps] = 1.0
        return w * (self.chunk_size / w.sum())

    def direct_context(self, memory: torch.Tensor) -> torch.Tensor | float:
        """(B, 1, d): what the direct path adds to every step token (0.0 without it).

        Memory layout (backbone.py): [embodiment][proprio][words][patches][keypoints], so the direct
        tokens are the first two and, with keypoints, the last `keypoints + 4`.
        """
        if self.direct is None:
            return 0.0
        tokens = memory[:, :2] if self.n_direct == 2 else torch.cat([memory[:, :2], memory[:, 2 - self.n_direct :]], 1)
        return self.direct(tokens.flatten(1))[:, None]

    def memory_context(
        self, memory: torch.Tensor, pad_mask: torch.Tensor, repeat: int | torch.Tensor = 1
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None, torch.Tensor | float]:
        """Per-block cross-attention K/V (B*repeat, H, S, hd), the SDPA mask and the direct-path vector
        (B*repeat, 1, d), computed once per chunk.

        `repeat` > 1 repeats each row's K/V (row-major: row 0 K times, then row 1...) instead of the
        memory itself, so drawing K samples costs no extra memory projections. A (B,) int64 tensor repeats
        row i repeat[i] times (rows that asked for different numbers of samples).
        """
        kvs = [blk.memory_kv(memory) for blk in self.blocks]
        mask = attend_mask(pad_mask)
        direct = self.direct_context(memory)
        if isinstance(repeat, torch.Tensor) or repeat > 1:
            kvs = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in kvs]
            mask = None if mask is None else mask.repeat_interleave(repeat, 0)
            if isinstance(direct, torch.Tensor):
                direct = direct.repeat_interleave(repeat, 0)
        return kvs, mask, direct

    def loss(
        self,
        memory: torch.Tensor,
        pad_mask: torch.Tensor,
        actions: torch.Tensor,
        generator: torch.Generator | None,
        committed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """actions: (B, T, D) normalized -> (scalar loss, metrics). committed: (B,) int64 steps per row given
        rather than predicted (training-time RTC), left out of the loss."""
        raise NotImplementedError

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
        """-> {"chunk": (B, T, D) normalized in [-1, 1], plus head-specific outputs}.

        row_samples: each row's own number of flow samples (instead of n_samples for all); prefix: the
        rows' committed prefixes (real-time chunking, rtc.py). Both None: the head's plain path."""
        raise NotImplementedError
