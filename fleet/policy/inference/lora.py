"""LoRA: low-rank adapters on a head's Linear layers for adaptation, merged into the weights for serving.

    params = add_lora(model.head("franka"), rank=8, alpha=16)   # adapters on; every other weight frozen
    opt = torch.optim.AdamW(params, lr=1e-3)                     # train only the adapters
    ...
    merge_lora(model.head("franka"))                             # W += (alpha / rank) B A; plain Linear again
    payload = head_to_bytes(model, "franka", version)            # same tensor names as before add_lora

A wrapped layer computes base(x) + (alpha / rank) * B(A(x)) with A (rank, in) Kaiming-initialised and
B (out, rank) zero, so a fresh adapter changes nothing. Unmerged, each adapted layer costs two extra
small matmuls per call; merging folds them into the base weight (the same function within float
rounding: merged == unmerged within 1e-5) and restores the original module names, so a merged head
serializes, validates and hot-swaps like any other head. `lora_state_dict` / `load_lora_state_dict`
carry the adapters alone (a few thousand numbers per head) when they must travel unmerged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fleet.validate import check_int, fail, is_number


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + scale * (x A^T) B^T."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        check_int("LoRA rank", rank, lo=1, expected="a positive int")
        if not (is_number(alpha) and math.isfinite(alpha) and alpha > 0):
            fail("LoRA alpha", "a positive number", alpha)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout: expected a number in [0, 1), got {dropout!r}")
        self.base = base
        base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """(out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (weights copied, base untouched)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight())
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _default_target(name: str, module: nn.Linear) -> bool:
    # the proprio stem is the head's input layer (tiny, and it feeds the frozen backbone): not adapted
    return "stem" not in name.split(".")


def add_lora(
    module: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target: Callable[[str, nn.Linear], bool] | None = None,
    freeze: bool = True,
) -> list[nn.Parameter]:
    """Wrap every Linear of `module` that `target(qualified_name, linear)` accepts (default: all but the
    proprio stem) in a LoRALinear, in place. With `freeze`, every other parameter of `module` stops
    requiring gradients. Returns the adapter parameters (A, B of each wrapped layer), the ones to train.
    Raises ValueError when `module` already has adapters or no Linear matches."""
    if has_lora(module):
        raise ValueError("add_lora: the module already has LoRA adapters (merge_lora or remove_lora first)")
    target = target or _default_target
    chosen = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and target(name, sub)]
    if not chosen:
        raise ValueError("add_lora: no Linear layer matches the target")
    # merge_lora / remove_lora restore these flags (the names are the same again then)
    module._lora_requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    if freeze:
        module.requires_grad_(False)
    for name, linear in chosen:
        _set_submodule(module, name, LoRALinear(linear, rank, alpha, dropout))
    return lora_parameters(module)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _wrapped(module: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, LoRALinear)]


def has_lora(module: nn.Module) -> bool:
    return bool(_wrapped(module))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices, in module order."""
    return [p for _, sub in _wrapped(module) for p in (sub.lora_A, sub.lora_B)]


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain Linear back (in place); returns how many
    layers were merged. The module's state_dict names, and which parameters require gradients, are then
    exactly those before add_lora."""
    wrapped = _wrapped(module)
    for name, sub in wrapped:
        _set_submodule(module, name, sub.merged())
    _restore_requires_grad(module)
    return len(wrapped)


def _restore_requires_grad(module: nn.Module) -> None:
    flags = module.__dict__.pop("_lora_requires_grad", None) or {}
    for name, p in module.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def remove_lora(module: nn.Module) -> int:
    """Drop every adapter unmerged (back to the base weights); returns how many layers were unwrapped."""
    wrapped = _wrapped(module)
    for name, sub in wrapped:
        _set_submodule(module, name, sub.base)
    _restore_requires_grad(module)
    return len(wrapped)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {"<layer>.lora_A": ..., "<layer>.lora_B": ...} (detached copies)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by lora_state_dict into a module with the same adapters; mismatches raise ValueError."""
    own = lora_state_dict(module)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state: missing {missing}, unexpected {unexpected}")
    for key, ref in own.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"LoRA state: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
    module.load_state_dict(state, strict=False)
