"""Where the shipped checkpoint lives, and loading a policy from a path or the default."""

from __future__ import annotations

from pathlib import Path

import fleet

DEFAULT_CHECKPOINT = Path(fleet.__file__).parent / "checkpoints" / "policy"
REPRODUCE = "fleet pretrain --out fleet/checkpoints"


def resolve_checkpoint(path: str | Path | None = None) -> Path:
    """The checkpoint prefix to load: `path`, or the shipped default."""
    if path is None:
        p = DEFAULT_CHECKPOINT
        if not p.with_name(p.name + ".safetensors").exists():
            raise FileNotFoundError(
                f"the shipped checkpoint {p}.safetensors is missing; reproduce it with `{REPRODUCE}`"
            )
        return p
    return Path(path)


def load_policy(path: str | Path | None = None):
    """(model, meta) from a checkpoint path or the shipped default; the model is in eval mode."""
    from fleet.policy.checkpoint import load_checkpoint  # torch: the launcher reads this module's paths without it

    model, meta = load_checkpoint(resolve_checkpoint(path))
    model.eval()
    return model, meta
