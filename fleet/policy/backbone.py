"""The shared backbone: one pre-LN transformer over [embodiment][proprio][instruction words][image patches].

Also home to `PolicyConfig` (every size of the model) and the attention blocks the heads reuse.
The backbone is frozen after pretraining; per-embodiment proprio stems live in the heads (see heads.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fleet.policy.vision import IMAGE_NORMS, PatchEncoder


@dataclass(frozen=True)
class PolicyConfig:
    """Every size of the policy; stored in checkpoints, so a loaded model has exactly these shapes."""

    d_model: int = 128
    # width of every token, in the backbone and in the heads (heads cross-attend to backbone memory)
    n_layers: int = 4
    # backbone transformer layers
    n_heads: int = 4
    # attention heads per backbone layer
    mlp_ratio: int = 4
    # backbone MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0
    # residual and attention dropout (0: the data is small and the sims are deterministic)
    image_size: int = 64
    # camera images are (image_size, image_size, 3) uint8
    patch_size: int = 8
    # 8 -> an 8x8 grid of 64 image tokens
    conv_stem: bool = True
    # two overlapping stride-2 convs before the patch projection (better localization, ~8 MMAC/image)
    keypoints: int = 0
    # spatial-softmax keypoint tokens added to the patch tokens (0 = none); they carry precise positions
    max_instr_len: int = 16
    # instruction words kept (longer instructions are truncated)
    chunk_size: int = 16
    # actions per chunk; every embodiment spec must agree
    n_bins: int = 64
    # token heads: bins per action dimension over normalized [-1, 1]
    head_layers: int = 2
    # decoder layers in each head
    head_heads: int = 4
    # attention heads per head layer
    head_mlp_ratio: int = 2
    # head MLP hidden width = head_mlp_ratio * d_model (heads are many, so they are kept lean)
    n_euler: int = 8
    # flow heads: Euler integration steps from noise to a chunk
    flow_train_noise: int = 4
    # flow heads: (noise, time) draws per row in the training loss (variance reduction, head cost only)
    loss_head_steps: int = 4
    # the first chunk steps (the ones a robot executes before the next chunk) get full loss weight
    loss_tail_weight: float = 0.25
    # loss weight of the later chunk steps: they are nearly determined by the first ones under teacher
    # forcing, so an unweighted loss is dominated by easy tokens and under-trains the first action
    aux_focus_weight: float = 5.0
    # weight of the auxiliary loss that trains the first instruction-queried keypoint to sit on the named
    # object (privileged sim positions from the demos; 0 = off). Without it the keypoints must discover the
    # object from the action loss alone, which left ~20% of reaches aimed at the wrong object
    head_direct: bool = True
    # each head also reads the backbone's embodiment, proprio and keypoint tokens directly (an MLP of
    # them added to every step token): where the object is must reach the first action without the
    # head having to learn to find it by cross-attention first
    flow_execute_sample: tuple[str, ...] = ()
    # embodiments whose flow head executes one of its K samples instead of their mean (the other samples
    # still feed the disagreement confidence). Measured on the leap hand (500 episodes each): the mean of
    # 4 samples 81 %, one sample 90 %; the aloha arms: mean 90 % in 28 steps, one sample 90 % in 36 steps
    rtc_trained: tuple[str, ...] = ()
    # embodiments whose head learned training-time real-time chunking (fleet.learning.rtc_round): a flow head
    # then takes a request's committed steps into its velocity network clean, at flow time 1, and clamps them
    # at every Euler step instead of guiding toward them (arXiv 2512.05964; no vector-Jacobian product). Token
    # heads force the committed steps either way

    image_norm: str = "fixed"
    # how a camera frame becomes the encoder's input: "fixed" (one affine map; the shipped checkpoint) or
    # "per_image" (each frame's own per-channel mean and spread, so a dimmer or colour-cast camera is
    # invisible to the policy; fleet.policy.vision.normalize_image)

    def __post_init__(self) -> None:
        for names in ("flow_execute_sample", "rtc_trained"):
            if isinstance(getattr(self, names), list):  # from JSON
                object.__setattr__(self, names, tuple(getattr(self, names)))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("flow_execute_sample", "rtc_trained"):
                if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"PolicyConfig.{f.name} must be a tuple of embodiment names, got {value!r}")
            elif f.name == "loss_tail_weight":
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"PolicyConfig.loss_tail_weight must be in [0, 1], got {value!r}")
            elif f.name == "aux_focus_weight":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"PolicyConfig.aux_focus_weight must be a number >= 0, got {value!r}")
            elif f.name == "dropout":
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"PolicyConfig.dropout must be in [0, 1), got {value!r}")
            elif f.name == "image_norm":
                if value not in IMAGE_NORMS:
                    raise ValueError(f"PolicyConfig.image_norm must be one of {IMAGE_NORMS}, got {value!r}")
            elif f.name in ("conv_stem", "head_direct"):
                if not isinstance(value, bool):
                    raise ValueError(f"PolicyConfig.{f.name} must be a bool, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < (0 if f.name == "keypoints" else 1):
                kind = "a non-negative" if f.name == "keypoints" else "a positive"
                raise ValueError(f"PolicyConfig.{f.name} must be {kind} int, got {value!r}")
        if self.d_model % self.n_heads or self.d_model % self.head_heads:
            raise ValueError(
                f"PolicyConfig.d_model {self.d_model} must be divisible by n_heads {self.n_heads} "
                f"and head_heads {self.head_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"PolicyConfig.image_size {self.image_size} must be a multiple of patch_size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PolicyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PolicyConfig: unknown fields {unknown}")
        return cls(**d)


def attend_mask(pad_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool True=padding -> (B, 1, 1, S) bool True=attend for SDPA; None when nothing is padded."""
    if pad_mask is None or not bool(pad_mask.any()):
        return None
    return ~pad_mask[:, None, None, :]


class KVCache:
    """Keys/values of the positions decoded so far, preallocated for a whole chunk: (B, H, T, hd)."""

    def __init__(self, batch: int, n_heads: int, length: int, head_dim: int, like: torch.Tensor) -> None:
        self.k = like.new_empty(batch, n_heads, length, head_dim)
        self.v = like.new_empty(batch, n_heads, length, head_dim)
        self.size = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, s, hd) after the cached positions; return all keys/values so far."""
        end = self.size + k.shape[2]
        self.k[:, :, self.size : end] = k
        self.v[:, :, self.size : end] = v
        self.size = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, S, d) -> (B, S, d). With `cache`, x holds only new positions, attending to all cached ones."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)
            causal = causal and s > 1  # one new query may see every cached key
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class CrossAttention(nn.Module):
    """Queries from the head, keys/values from backbone memory; `memory_kv` runs once per chunk."""

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: (B, S, d) -> k, v: (B, H, S, hd)."""
        b, s, d = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, T, d) -> (B, T, d); mask: (B, 1, 1, S) bool True=attend, or None."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), SelfAttention(d, n_heads, dropout)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class Backbone(nn.Module):
    """Vision encoder, word embeddings (embodiment tokens included) and the shared transformer.

    Sequence: [embodiment token] [proprio token] [max_instr_len words] [image patches], S = 2 + L + N.
    """

    def __init__(self, config: PolicyConfig, vocab_size: int) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.vision = PatchEncoder(
            d, config.image_size, config.patch_size, config.conv_stem, config.keypoints, config.image_norm
        )
        self.word_embed = nn.Embedding(vocab_size, d, padding_idx=0)
        nn.init.normal_(self.word_embed.weight, std=0.02)
        with torch.no_grad():
            self.word_embed.weight[0].zero_()
        self.instr_pos = nn.Parameter(torch.randn(config.max_instr_len, d) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(d, config.n_heads, config.mlp_ratio, config.dropout) for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        # {vocabulary id: (d,) row} of embodiments added after pretraining; the rows live in their heads, never in
        # word_embed (FleetPolicy.add_embodiment sets it; a plain attribute: no state_dict entry here)
        self.token_rows: dict[int, torch.Tensor] = {}

    def embodiment_vectors(self, emb_ids: torch.Tensor) -> torch.Tensor:
        """(B,) embodiment-token ids -> (B, d): pretrained rows from the table, added bodies' rows from their heads."""
        if not self.token_rows:
            return self.word_embed(emb_ids)
        out = self.word_embed(emb_ids.clamp(max=self.word_embed.num_embeddings - 1))
        for token_id, row in self.token_rows.items():
            out = torch.where((emb_ids == token_id).unsqueeze(-1), row.to(out.dtype), out)
        return out

    def forward(
        self,
        image: torch.Tensor,
        emb_ids: torch.Tensor,
        proprio_tok: torch.Tensor,
        instr_ids: torch.Tensor,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (B,H,W,3) uint8, emb_ids (B,) vocab ids, proprio_tok (B,d), instr_ids (B,L) with L <= max_instr_len.

        words: (B, L, d) word vectors to use instead of `word_embed(instr_ids)` (a head's word adapters,
        FleetPolicy.word_vectors); None = the embedding table's.

        Returns memory (B, S, d) after the final LayerNorm, pad_mask (B, S) bool True=padding, and
        pooled (B, d): the embodiment token's output, the feature OOD scoring uses.
        """
        return self.transformer(
            self.vision_tokens(image, instr_ids, words), emb_ids, proprio_tok, instr_ids, words=words
        )

    def instruction_summary(self, instr_ids: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, d) bag of word embeddings of the instruction (padding excluded) that FiLM-conditions the
        keypoints; None without keypoints."""
        if not self.config.keypoints:
            return None
        valid = (instr_ids != 0).unsqueeze(-1).to(self.instr_pos.dtype)
        vectors = self.word_embed(instr_ids) if words is None else words
        return (vectors * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    def vision_tokens(
        self, image: torch.Tensor, instr_ids: torch.Tensor, words: torch.Tensor | None = None
    ) -> torch.Tensor:
        """image (B, H, W, 3) uint8, instr_ids (B, L) -> image tokens (B, N, d): everything that depends on the
        camera frame (and, through the keypoint FiLM, on the instruction). Servers cache it per robot."""
        return self.vision(image, self.instruction_summary(instr_ids, words))

    def transformer(
        self,
        tokens: torch.Tensor,
        emb_ids: torch.Tensor,
        proprio_tok: torch.Tensor,
        instr_ids: torch.Tensor,
        mask_fn=attend_mask,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rest of `forward` given the image tokens -> (memory, pad_mask, pooled). `mask_fn` turns the
        padding mask into the attention mask (ONNX export passes one without data-dependent branches)."""
        b, length = instr_ids.shape
        if length > self.config.max_instr_len:
            raise ValueError(f"instr_ids: length {length} exceeds max_instr_len {self.config.max_instr_len}")
        words = (self.word_embed(instr_ids) if words is None else words) + self.instr_pos[:length]
        head = torch.stack([self.embodiment_vectors(emb_ids).to(words.dtype), proprio_tok.to(words.dtype)], dim=1)
        x = torch.cat([head, words, tokens.to(words.dtype)], dim=1)
        pad_mask = torch.zeros(b, x.shape[1], dtype=torch.bool, device=x.device)
        pad_mask[:, 2 : 2 + length] = instr_ids == 0
        mask = mask_fn(pad_mask)
        for block in self.blocks:
            x = block(x, mask)
        memory = self.norm(x)
        return memory, pad_mask, memory[:, 0]
