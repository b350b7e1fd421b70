"""The embodiment registry: what each robot body looks like to the policy and to the safety layer.

A spec is a frozen, validated dataclass. `EMBODIMENTS` holds the four bodies from the course notes;
`register_embodiment(spec)` adds a fifth without editing the package.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from fleet import validate

HeadKind = Literal["token", "flow"]


@dataclass(frozen=True)
class EmbodimentSpec:
    """One robot body. Every per-dimension field has `action_dim` entries."""

    name: str
    # short lowercase identifier, also the embodiment token: "franka" -> [EMB_FRANKA]
    action_dim: int
    # number of action dimensions the head emits per control step
    head: HeadKind
    # "token": per-dimension bins decoded step by step; "flow": flow matching over the chunk
    proprio_dim: int
    # length of the float32 proprioception vector in observations
    action_low: tuple[float, ...]
    # workspace lower bound per action dimension (the safety layer clips here)
    action_high: tuple[float, ...]
    # workspace upper bound per action dimension
    max_velocity: tuple[float, ...]
    # fastest allowed change of each commanded dimension, in units per second
    max_force: float
    # measured force/torque norm (N) above which the robot emergency-stops
    control_hz: float
    # control ticks per second in real-time mode
    chunk_size: int = 16
    # actions per policy reply
    recompute_every: int = 4
    # ask for a new chunk after this many actions of the current one were used
    max_velocity_norm: float | None = None
    # optional bound on the norm of the per-second change vector; None = sqrt(sum(max_velocity^2))
    max_acceleration: tuple[float, ...] | None = None
    # optional per-dimension bound on the change of the change, units per second^2
    max_episode_steps: int = 100
    # time limit of one simulated episode, in control ticks
    stop_action: tuple[float, ...] | None = None
    # what the robot is commanded when it must hold still: zeros for velocity or delta commands (repeating
    # the last one would keep it moving); None = repeat the last sent command (right for position targets)
    dim_names: tuple[str, ...] = field(default=())
    # human-readable name per action dimension (for plots and errors); empty = "a0", "a1", ...
    description: str = ""
    # one line shown in `fleet status` and the README
    position_limits: tuple[tuple[int, int, float, float], ...] = ()
    # virtual walls for delta-commanded dimensions, each (action index, proprio index, low, high): the safety
    # layer keeps the position a command leads to, proprio[p] + action[a], inside [low, high] (franka: the
    # end effector may press at most 1 cm into the table; LeRobot's end_effector_bounds do the same)

    def __post_init__(self) -> None:
        def fail(field_name: str, expected: str, got: object) -> NoReturn:
            validate.fail(f"EmbodimentSpec {self.name!r}: field {field_name!r}", expected, got)

        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name.lower() != self.name:
            fail("name", "a lowercase identifier such as 'franka'", self.name)
        if not _is_int(self.action_dim) or self.action_dim < 1:
            fail("action_dim", "a positive int", self.action_dim)
        if self.head not in ("token", "flow"):
            fail("head", "'token' or 'flow'", self.head)
        if not _is_int(self.proprio_dim) or self.proprio_dim < 1:
            fail("proprio_dim", "a positive int", self.proprio_dim)
        for fname in ("action_low", "action_high", "max_velocity"):
            value = getattr(self, fname)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != self.action_dim:
                fail(fname, f"a sequence of {self.action_dim} floats (action_dim)", value)
            if not all(_is_real(v) and math.isfinite(v) for v in value):
                fail(fname, "finite numbers", value)
            object.__setattr__(self, fname, tuple(float(v) for v in value))
        if any(lo >= hi for lo, hi in zip(self.action_low, self.action_high, strict=True)):
            fail("action_low/action_high", "low < high in every dimension", (self.action_low, self.action_high))
        if any(v <= 0 for v in self.max_velocity):
            fail("max_velocity", "positive in every dimension", self.max_velocity)
        if self.max_acceleration is not None:
            acc = self.max_acceleration
            if (
                isinstance(acc, (str, bytes))
                or not hasattr(acc, "__len__")
                or len(acc) != self.action_dim
                or not all(_is_real(v) and math.isfinite(v) and v > 0 for v in acc)
            ):
                fail("max_acceleration", f"None or {self.action_dim} positive finite floats", acc)
            object.__setattr__(self, "max_acceleration", tuple(float(v) for v in acc))
        if not (_is_real(self.max_force) and math.isfinite(self.max_force) and self.max_force > 0):
            fail("max_force", "a positive finite number of newtons", self.max_force)
        if not (_is_real(self.control_hz) and 0 < self.control_hz <= 1000):
            fail("control_hz", "a number in (0, 1000]", self.control_hz)
        if not _is_int(self.chunk_size) or self.chunk_size < 1:
            fail("chunk_size", "a positive int", self.chunk_size)
        if not _is_int(self.recompute_every) or not 1 <= self.recompute_every <= self.chunk_size:
            fail("recompute_every", f"an int in [1, chunk_size={self.chunk_size}]", self.recompute_every)
        if self.max_velocity_norm is not None and not (
            _is_real(self.max_velocity_norm) and math.isfinite(self.max_velocity_norm) and self.max_velocity_norm > 0
        ):
            fail("max_velocity_norm", "None or a positive number", self.max_velocity_norm)
        if not _is_int(self.max_episode_steps) or self.max_episode_steps < 1:
            fail("max_episode_steps", "a positive int", self.max_episode_steps)
        if self.stop_action is not None:
            stop = self.stop_action
            if isinstance(stop, (str, bytes)) or not hasattr(stop, "__len__") or len(stop) != self.action_dim:
                fail("stop_action", f"None or {self.action_dim} floats", stop)
            if not all(
                _is_real(v) and lo <= v <= hi for v, lo, hi in zip(stop, self.action_low, self.action_high, strict=True)
            ):
                fail("stop_action", "values inside [action_low, action_high]", stop)
            object.__setattr__(self, "stop_action", tuple(float(v) for v in stop))
        if isinstance(self.dim_names, str) or (self.dim_names and len(self.dim_names) != self.action_dim):
            fail("dim_names", f"empty or {self.action_dim} names", self.dim_names)
        object.__setattr__(self, "dim_names", tuple(str(n) for n in self.dim_names))
        if not self.dim_names:
            object.__setattr__(self, "dim_names", tuple(f"a{i}" for i in range(self.action_dim)))
        object.__setattr__(self, "position_limits", self._checked_walls(fail))

    def _checked_walls(self, fail) -> tuple[tuple[int, int, float, float], ...]:
        walls = self.position_limits
        expected = "a sequence of (action index, proprio index, low, high) entries"
        if isinstance(walls, (str, bytes)) or not hasattr(walls, "__len__"):
            fail("position_limits", expected, walls)
        out = []
        for wall in walls:
            if isinstance(wall, (str, bytes)) or not hasattr(wall, "__len__") or len(wall) != 4:
                fail("position_limits", expected, walls)
            a, p, lo, hi = wall
            if not (_is_int(a) and 0 <= a < self.action_dim):
                fail("position_limits", f"action indices in [0, action_dim={self.action_dim})", wall)
            if not (_is_int(p) and 0 <= p < self.proprio_dim):
                fail("position_limits", f"proprio indices in [0, proprio_dim={self.proprio_dim})", wall)
            if not (_is_real(lo) and _is_real(hi) and math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                fail("position_limits", "finite low < high", wall)
            out.append((int(a), int(p), float(lo), float(hi)))
        if len({w[0] for w in out}) != len(out):
            fail("position_limits", "at most one wall per action dimension", walls)
        return tuple(out)

    @property
    def token(self) -> str:
        """The embodiment token prepended to the policy's input sequence."""
        return f"[EMB_{self.name.upper()}]"

    @property
    def dt(self) -> float:
        """Control period in seconds."""
        return 1.0 / self.control_hz

    @property
    def velocity_norm_bound(self) -> float:
        if self.max_velocity_norm is not None:
            return float(self.max_velocity_norm)
        return math.sqrt(sum(v * v for v in self.max_velocity))

    def to_dict(self) -> dict:
        """Plain JSON-able dict (stored in checkpoint metadata)."""
        return {
            "name": self.name,
            "action_dim": self.action_dim,
            "head": self.head,
            "proprio_dim": self.proprio_dim,
            "action_low": list(self.action_low),
            "action_high": list(self.action_high),
            "max_velocity": list(self.max_velocity),
            "max_force": self.max_force,
            "control_hz": self.control_hz,
            "chunk_size": self.chunk_size,
            "recompute_every": self.recompute_every,
            "max_velocity_norm": self.max_velocity_norm,
            "max_acceleration": None if self.max_acceleration is None else list(self.max_acceleration),
            "max_episode_steps": self.max_episode_steps,
            "stop_action": None if self.stop_action is None else list(self.stop_action),
            "dim_names": list(self.dim_names),
            "description": self.description,
            "position_limits": [list(w) for w in self.position_limits],
        }

    @classmethod
    def from_dict(cls, d: dict) -> EmbodimentSpec:
        kw = dict(d)
        for k in ("action_low", "action_high", "max_velocity", "dim_names"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        for k in ("max_acceleration", "stop_action"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# fleet.validate's is_number / is_int, widened to numpy scalars: a spec's bounds may come as numpy arrays
# (float32 or int64 elements, tests/unit/test_embodiments.py), which those refuse
def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _arm(prefix: str = "") -> tuple[str, ...]:
    return tuple(f"{prefix}{n}" for n in ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"))


# Arm actions are end-effector delta poses per tick (metres, radians) plus a gripper command in [-1, 1]
# (-1 open, +1 closed). Velocity limits bound how fast each command may change; they allow the full
# gripper stroke in 0.2 s and a full-scale translation command change in about 3 ticks.
_FRANKA = EmbodimentSpec(
    name="franka",
    action_dim=7,
    head="token",
    proprio_dim=8,
    action_low=(-0.05, -0.05, -0.05, -0.1, -0.1, -0.1, -1.0),
    action_high=(0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 1.0),
    max_velocity=(0.4, 0.4, 0.4, 0.8, 0.8, 0.8, 10.0),
    max_force=30.0,
    control_hz=10.0,
    max_episode_steps=80,
    stop_action=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0),  # stop moving, keep a held object gripped
    dim_names=_arm(),
    description="7-DOF arm: pick up the named object (end-effector delta pose + gripper)",
    # the end effector's height (proprio 2) after a dz command: at most 1 cm into the table (8 N in the sim; the
    # e-stop trips at 30 N, 3.75 cm), at most the arm's 0.3 m reach
    position_limits=((2, 2, -0.01, 0.3),),
)

_ALOHA = EmbodimentSpec(
    name="aloha",
    action_dim=14,
    head="flow",
    proprio_dim=16,
    action_low=(-0.05, -0.05, -0.05, -0.1, -0.1, -0.1, -1.0) * 2,
    action_high=(0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 1.0) * 2,
    max_velocity=(0.8, 0.8, 0.8, 1.6, 1.6, 1.6, 20.0) * 2,
    max_force=40.0,
    control_hz=20.0,
    max_episode_steps=100,
    stop_action=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0) * 2,
    dim_names=_arm("left_") + _arm("right_"),
    description="bimanual arms: grasp both ends of the bar and lift (2 x delta pose + gripper)",
)

# Mobile base actions are body-frame velocities (m/s, m/s, rad/s).
_HELLO = EmbodimentSpec(
    name="hello",
    action_dim=3,
    head="token",
    proprio_dim=5,
    action_low=(-0.6, -0.6, -1.5),
    action_high=(0.6, 0.6, 1.5),
    max_velocity=(2.4, 2.4, 6.0),
    max_force=60.0,
    control_hz=5.0,
    max_episode_steps=80,
    stop_action=(0.0, 0.0, 0.0),
    dim_names=("vx", "vy", "yaw_rate"),
    description="mobile base (Stretch): drive to the named marker around obstacles (vx, vy, yaw rate)",
)

# Hand actions are absolute joint and wrist targets (radians), normalised joint range [0, 1.6];
# the simulated hand tracks targets with a first-order lag.
_LEAP = EmbodimentSpec(
    name="leap",
    action_dim=24,
    head="flow",
    proprio_dim=24,
    action_low=(0.0,) * 16 + (-0.6,) * 8,
    action_high=(1.6,) * 16 + (0.6,) * 8,
    max_velocity=(6.0,) * 16 + (3.0,) * 8,
    max_force=20.0,
    control_hz=10.0,
    max_episode_steps=40,
    dim_names=tuple(f"finger{f}_j{j}" for f in range(4) for j in range(4)) + tuple(f"wrist{i}" for i in range(8)),
    description="dexterous hand: shape the grasp the object in view calls for (24 joint and wrist targets)",
)

EMBODIMENTS: dict[str, EmbodimentSpec] = {s.name: s for s in (_FRANKA, _ALOHA, _HELLO, _LEAP)}
BUILTIN_EMBODIMENTS: tuple[str, ...] = tuple(EMBODIMENTS)

# A low-cost 6-dim arm (SO-100-like: 5 revolute joints + a gripper) that pretraining never saw. Its actions are
# joint-angle deltas per tick (radians) plus the gripper command, not end-effector deltas: the policy must
# learn its kinematics from demonstrations (fleet/sim/so100.py; `fleet experiment onboard`).
_SO100 = EmbodimentSpec(
    name="so100",
    action_dim=6,
    head="token",
    proprio_dim=7,
    action_low=(-0.1,) * 5 + (-1.0,),
    action_high=(0.1,) * 5 + (1.0,),
    max_velocity=(1.6,) * 5 + (10.0,),
    max_force=25.0,
    control_hz=10.0,
    max_episode_steps=100,
    stop_action=(0.0,) * 5 + (1.0,),
    dim_names=("d_pan", "d_lift", "d_elbow", "d_wrist_pitch", "d_wrist_roll", "gripper"),
    description="low-cost 6-dim arm (SO-100-like): pick up the named object (joint deltas + gripper)",
)

# Bodies this package can simulate but which are not part of the fleet until someone adds them
# (`fleet embodiment add`, `register_embodiment`): pretraining, `fleet up` and every loop over
# EMBODIMENTS leave them out; `get_embodiment` still finds them, so their simulator can be built.
CATALOG: dict[str, EmbodimentSpec] = {_SO100.name: _SO100}


def register_embodiment(spec: EmbodimentSpec, *, replace: bool = False) -> EmbodimentSpec:
    """Add a robot body to the registry. Refuses a malformed spec or a silent overwrite."""
    if not isinstance(spec, EmbodimentSpec):
        raise TypeError(f"register_embodiment expects an EmbodimentSpec, got {type(spec).__name__}")
    if spec.name in EMBODIMENTS and not replace:
        raise ValueError(f"embodiment {spec.name!r} is already registered; pass replace=True to overwrite it")
    if spec.name in BUILTIN_EMBODIMENTS and replace:
        raise ValueError(f"embodiment {spec.name!r} is built in and cannot be replaced")
    EMBODIMENTS[spec.name] = spec
    return spec


def get_embodiment(name: str) -> EmbodimentSpec:
    """Look up a spec by name (the registry first, then the catalog of bodies not yet added) with an error that
    lists what exists."""
    spec = EMBODIMENTS.get(name) or CATALOG.get(name)
    if spec is None:
        known = f"known: {sorted(EMBODIMENTS)} (not yet added: {sorted(CATALOG)})"
        raise ValueError(f"unknown embodiment {name!r}; {known}")
    return spec


# ---- the bodies' command loops -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommandSpec:
    """How a body takes setpoints (the controller loop of fleet/robot/runtime.py). Kept apart from
    `EmbodimentSpec`, which is the policy's contract and stored in checkpoints: a faster motor controller
    changes no head."""

    command_hz: float | None = None
    # setpoints per second; None = one per policy action (the controller passes the policy's actions through)
    max_jerk: tuple[float, ...] | None = None
    # optional per-dimension bound on the change of the acceleration, units per second^3

    def __post_init__(self) -> None:
        if self.command_hz is not None and not (_is_real(self.command_hz) and 0 < self.command_hz <= 10_000):
            validate.fail("CommandSpec.command_hz", "None or a number in (0, 10000]", self.command_hz)
        if self.max_jerk is not None:
            jerk = tuple(self.max_jerk)
            if not jerk or not all(_is_real(v) and math.isfinite(v) and v > 0 for v in jerk):
                validate.fail("CommandSpec.max_jerk", "None or positive finite floats, one per action dim", jerk)
            object.__setattr__(self, "max_jerk", tuple(float(v) for v in jerk))


COMMAND_SPECS: dict[str, CommandSpec] = {
    "franka": CommandSpec(command_hz=1000.0),  # libfranka's 1 kHz command loop
    "aloha": CommandSpec(command_hz=500.0),
    "hello": CommandSpec(command_hz=100.0),
    "leap": CommandSpec(command_hz=500.0),
}
# a body registered without one passes its policy's actions through at control_hz


def command_spec(name: str) -> CommandSpec:
    """The command loop body `name` declares (pass-through when it declares none)."""
    get_embodiment(name)
    return COMMAND_SPECS.get(name, CommandSpec())
