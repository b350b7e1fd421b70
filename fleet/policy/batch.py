"""Validated, stacked model input for a mixed-embodiment batch, and action (de)normalization.

`collate` checks every observation (a malformed one raises ValueError naming the row, the field and
the expected shape, so a server can reject that request alone) and stacks each field with numpy
before a single `torch.from_numpy`. `set_row_options` adds what each row asked for beyond its
observation: its own number of flow samples and its committed prefix (real-time chunking, rtc.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fleet.embodiments import EmbodimentSpec
from fleet.policy.rtc import GroupPrefix
from fleet.policy.tokenizer import Vocabulary
from fleet.protocol import RequestError, check_prefix

IMAGE_SHAPE = (64, 64, 3)


def normalize_actions(spec: EmbodimentSpec, actions: np.ndarray) -> np.ndarray:
    """(..., D) physical units -> (..., D) float32 in [-1, 1] (clipped): n = 2 (a - low) / (high - low) - 1."""
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    return np.clip(2.0 * (np.asarray(actions, np.float32) - low) / (high - low) - 1.0, -1.0, 1.0).astype(np.float32)


def denormalize_actions(spec: EmbodimentSpec, normalized: np.ndarray) -> np.ndarray:
    """(..., D) normalized -> (..., D) float32 physical units: a = low + (n + 1) / 2 (high - low)."""
    low, high = np.asarray(spec.action_low, np.float32), np.asarray(spec.action_high, np.float32)
    return (low + (np.asarray(normalized, np.float32) + 1.0) * 0.5 * (high - low)).astype(np.float32)


@dataclass
class PolicyBatch:
    """B rows, any mix of embodiments."""

    image: torch.Tensor  # (B, 64, 64, 3) uint8
    proprio: torch.Tensor  # (B, Pmax) float32, row i valid in [:proprio_dim of its embodiment], zeros after
    instr_ids: torch.Tensor  # (B, L) int64 word ids, [PAD]=0 after the instruction
    emb_idx: torch.Tensor  # (B,) int64: vocabulary id of the row's [EMB_<NAME>] token (the sequence's first token)
    embodiments: list[str]  # (B,) embodiment name per row
    actions: torch.Tensor | None = None  # (B, T, Dmax) float32 normalized, zeros past the row's action_dim
    focus: torch.Tensor | None = None  # (B, 2) float32 privileged image position of the named object (training)
    n_samples: list[int] | None = None  # (B,) flow samples per row; None = predict's n_samples for every row
    prefix: list[tuple[np.ndarray, int] | None] | None = None
    # (B,) per row None or (actions (n, D) float32 physical units for ticks obs_tick.., delay d <= n committed)
    _groups: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.embodiments)

    def groups(self) -> dict[str, torch.Tensor]:
        """Embodiment name -> int64 row indices, in order of first appearance."""
        if self._groups is None:
            rows: dict[str, list[int]] = {}
            for i, name in enumerate(self.embodiments):
                rows.setdefault(name, []).append(i)
            self._groups = {n: torch.tensor(r, dtype=torch.long) for n, r in rows.items()}
        return self._groups

    def head_options(self, spec: EmbodimentSpec, idx: torch.Tensor, n_samples: int) -> dict:
        """Keyword options for head `spec.name`'s `predict` on rows `idx`: {} when no row asked for anything
        of its own (the head then runs exactly as before per-row options existed); else `row_samples`
        (list of K per row) and, when a row carries a prefix, `prefix` (GroupPrefix, normalized)."""
        opts: dict = {}
        rows = idx.tolist()
        if self.n_samples is not None:
            ks = [int(self.n_samples[i]) for i in rows]
            if any(k != n_samples for k in ks):
                opts["row_samples"] = ks
        if self.prefix is not None and any(self.prefix[i] is not None for i in rows):
            t, d = spec.chunk_size, spec.action_dim
            target = np.zeros((len(rows), t, d), np.float32)
            length, delay = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
            for j, i in enumerate(rows):
                if self.prefix[i] is not None:
                    actions, length[j], delay[j] = self.prefix[i][0], len(self.prefix[i][0]), self.prefix[i][1]
                    target[j, : len(actions)] = normalize_actions(spec, actions)
            opts["prefix"] = GroupPrefix(torch.from_numpy(target), torch.from_numpy(length), torch.from_numpy(delay))
        return opts


def _bad(i: int, name: str, field_name: str, expected: str, got: str) -> ValueError:
    return ValueError(f"observation {i} ({name}): field {field_name!r} must be {expected}, got {got}")


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def collate(
    observations: Sequence[Mapping],
    embodiments: Sequence[str],
    vocab: Vocabulary,
    specs: Mapping[str, EmbodimentSpec],
    actions: Sequence[np.ndarray] | None = None,
    max_len: int = 16,
) -> PolicyBatch:
    """Validate and stack observations (dicts with image, proprio, instruction) of the named embodiments.

    actions: optional per row (T, D) float32 physical units; normalized (and clipped) here.
    Raises ValueError naming the row index, the field and the expected shape/dtype.
    """
    b = len(observations)
    if b == 0:
        raise ValueError("collate: empty batch")
    if len(embodiments) != b:
        raise ValueError(f"collate: {b} observations but {len(embodiments)} embodiment names")
    if actions is not None and len(actions) != b:
        raise ValueError(f"collate: {b} observations but {len(actions)} action chunks")
    row_specs: list[EmbodimentSpec] = []
    for i, name in enumerate(embodiments):
        spec = specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValueError(f"observation {i}: unknown embodiment {name!r}; known: {sorted(specs)}")
        if spec.token not in vocab:
            raise ValueError(f"observation {i}: embodiment {name!r} has no token {spec.token} in the vocabulary")
        row_specs.append(spec)
    p_max = max(s.proprio_dim for s in row_specs)
    images = []
    proprio = np.zeros((b, p_max), np.float32)
    instr = np.empty((b, max_len), np.int64)
    for i, (obs, spec) in enumerate(zip(observations, row_specs, strict=True)):
        if not isinstance(obs, Mapping):
            raise ValueError(f"observation {i} ({spec.name}): expected a dict, got {type(obs).__name__}")
        for key in ("image", "proprio", "instruction"):
            if key not in obs:
                raise ValueError(f"observation {i} ({spec.name}): missing field {key!r}")
        img = obs["image"]
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != IMAGE_SHAPE:
            raise _bad(i, spec.name, "image", f"a uint8 array of shape {IMAGE_SHAPE}", _describe(img))
        images.append(img)
        prop = obs["proprio"]
        try:
            prop = np.asarray(prop, np.float32)
        except (TypeError, ValueError):
            raise _bad(i, spec.name, "proprio", f"float32 of shape ({spec.proprio_dim},)", _describe(prop)) from None
        if prop.shape != (spec.proprio_dim,):
            raise _bad(i, spec.name, "proprio", f"float32 of shape ({spec.proprio_dim},)", f"shape {prop.shape}")
        if not np.isfinite(prop).all():
            raise _bad(i, spec.name, "proprio", "finite (no NaN/inf)", f"{prop.tolist()}")
        proprio[i, : spec.proprio_dim] = prop
        text = obs["instruction"]
        if not isinstance(text, str):
            raise _bad(i, spec.name, "instruction", "a str", type(text).__name__)
        instr[i] = vocab.encode(text, max_len)
    emb_idx = np.array([vocab.token_id(s.token) for s in row_specs], np.int64)
    norm = None
    if actions is not None:
        d_max = max(s.action_dim for s in row_specs)
        t = row_specs[0].chunk_size
        sizes = sorted({s.chunk_size for s in row_specs})
        if len(sizes) > 1:
            raise ValueError(f"collate: embodiments in one batch must share chunk_size, got {sizes}")
        norm = np.zeros((b, t, d_max), np.float32)
        for i, (a, spec) in enumerate(zip(actions, row_specs, strict=True)):
            a = np.asarray(a, np.float32)
            if a.shape != (spec.chunk_size, spec.action_dim):
                raise _bad(i, spec.name, "actions", f"shape ({spec.chunk_size}, {spec.action_dim})", f"{a.shape}")
            if not np.isfinite(a).all():
                raise _bad(i, spec.name, "actions", "finite (no NaN/inf)", "non-finite values")
            norm[i, :, : spec.action_dim] = normalize_actions(spec, a)
    return PolicyBatch(
        image=torch.from_numpy(np.stack(images)),
        proprio=torch.from_numpy(proprio),
        instr_ids=torch.from_numpy(instr),
        emb_idx=torch.from_numpy(emb_idx),
        embodiments=list(embodiments),
        actions=None if norm is None else torch.from_numpy(norm),
    )


def set_row_options(
    batch: PolicyBatch,
    specs: Mapping[str, EmbodimentSpec],
    n_samples: Sequence[int] | None = None,
    prefixes: Sequence[tuple[np.ndarray, int | None] | None] | None = None,
) -> PolicyBatch:
    """Attach per-row options to `batch` (in place; returned for chaining), validated: n_samples (B,) ints
    >= 1 (flow heads draw that many samples for the row alone; token heads ignore it), prefixes (B,) None or
    (actions (n, D) physical, delay or None = n). Raises ValueError naming the row and the field."""
    b = len(batch)
    if n_samples is not None:
        ks = list(n_samples)
        if len(ks) != b:
            raise ValueError(f"n_samples: expected {b} values (one per row), got {len(ks)}")
        for i, k in enumerate(ks):
            if isinstance(k, np.integer):
                k = int(k)
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"row {i}: n_samples must be an int >= 1, got {k!r}")
        batch.n_samples = [int(k) for k in ks]
    if prefixes is not None:
        rows = list(prefixes)
        if len(rows) != b:
            raise ValueError(f"prefix: expected {b} entries (one per row, None for none), got {len(rows)}")
        out: list[tuple[np.ndarray, int] | None] = []
        for i, (item, name) in enumerate(zip(rows, batch.embodiments, strict=True)):
            if item is None:
                out.append(None)
                continue
            try:
                out.append(check_prefix(specs[name], item[0], item[1]))
            except RequestError as exc:
                raise ValueError(f"row {i} ({name}): {exc}") from None
        batch.prefix = out if any(p is not None for p in out) else None
    return batch
