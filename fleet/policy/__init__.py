"""The multi-embodiment VLA policy (torch): tokenizer, encoders, backbone, heads, checkpoints, training.

Exports resolve lazily (PEP 562), so importing a numpy-only submodule such as `fleet.policy.demos`
does not pull in torch: robot actors must stay torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "PolicyConfig": "fleet.policy.backbone",
    "PolicyBatch": "fleet.policy.batch",
    "collate": "fleet.policy.batch",
    "normalize_actions": "fleet.policy.batch",
    "denormalize_actions": "fleet.policy.batch",
    "save_checkpoint": "fleet.policy.checkpoint",
    "load_checkpoint": "fleet.policy.checkpoint",
    "save_head": "fleet.policy.checkpoint",
    "load_head": "fleet.policy.checkpoint",
    "head_to_bytes": "fleet.policy.checkpoint",
    "head_from_bytes": "fleet.policy.checkpoint",
    "FlowHead": "fleet.policy.flow_head",
    "TokenHead": "fleet.policy.token_head",
    "FleetPolicy": "fleet.policy.model",
    "Vocabulary": "fleet.policy.tokenizer",
    "DEFAULT_WORDS": "fleet.policy.tokenizer",
    "default_vocabulary": "fleet.policy.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet.policy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
