"""Simulated embodiments (gymnasium, numpy rendering), their distribution shifts and the teleoperator.

`make_env(name, seed=None, shift=None)` builds one; shifts compose with '+': "lighting+actuator_bias".
"""

from __future__ import annotations

import gymnasium as gym

from fleet.sim.base import SHIFTS, FleetEnv, parse_shift

_REGISTRY: dict[str, type[FleetEnv]] = {}
_LOADED = False


def register_env(name: str, cls: type[FleetEnv]) -> None:
    """Let a user-registered embodiment bring its own simulator class."""
    if not (isinstance(cls, type) and issubclass(cls, FleetEnv)):
        raise TypeError(f"register_env: {cls!r} is not a FleetEnv subclass")
    _builtin()
    _REGISTRY[name] = cls


def _builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    # the bodies import fleet.sim.base, and so this package: loading them on first use breaks the circle
    from fleet.sim.aloha import AlohaEnv
    from fleet.sim.franka import FrankaEnv
    from fleet.sim.hello import HelloEnv
    from fleet.sim.leap import LeapEnv
    from fleet.sim.so100 import So100Env

    for cls in (FrankaEnv, AlohaEnv, HelloEnv, LeapEnv, So100Env):
        _REGISTRY.setdefault(cls.embodiment, cls)


def make_env(name: str, seed: int | None = None, shift=None) -> gym.Env:
    """Build the simulated robot `name`; `seed` fixes the first reset's episode, `shift` names shifts."""
    _builtin()
    if name not in _REGISTRY:
        raise ValueError(f"make_env: no simulator for embodiment {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](seed=seed, shift=shift)


def env_names() -> list[str]:
    _builtin()
    return sorted(_REGISTRY)


__all__ = ["SHIFTS", "FleetEnv", "make_env", "parse_shift", "register_env", "env_names", "INSTRUCTION_WORDS"]

# every word an instruction can contain, novel ones included (the tokenizer's vocabulary uses this)
INSTRUCTION_WORDS: tuple[str, ...] = (
    "pick up the a lift bar with both arms drive to marker grasp "
    "red green blue yellow purple orange cyan pink cube sphere cone ring star "
    "ball can bottle pen card coin marble egg block apple key disk"
).split()
