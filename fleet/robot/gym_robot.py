"""Any gymnasium environment as a fleet robot: `GymRobot` (the body) and `GymTask` (its episodes), with a declared
mapping from the env's observations to the fleet's camera image and proprioception, and the instruction from
config. `gym_embodiment` derives the body's `EmbodimentSpec` from the env's action space and the mapping, so after
`register_embodiment` the server, safety layer, monitor and correction log handle it like a built-in body.

    env = gymnasium.make("gym_aloha/AlohaInsertion-v0", obs_type="pixels_agent_pos")
    mapping = GymMapping(image="pixels.top", proprio=("agent_pos",), instruction="insert the peg", control_hz=50)
    register_embodiment(gym_embodiment("aloha_sim", env, mapping))
    robot, task = gym_robot(env, "aloha_sim", mapping)
    loop = RobotLoop(RobotConfig("r0", "aloha_sim"), client, robot=robot, task=task)

The env is stepped once per command (pass-through: a gymnasium env takes its actions at its own control rate).
Images are resized to the policy's 64 x 64 (nearest pixel); proprio is the mapped keys concatenated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fleet.embodiments import EmbodimentSpec, get_embodiment
from fleet.robot.interface import EpisodeStatus, Robot, Task
from fleet.validate import check_number, check_str

IMAGE_SIZE = 64
# the policy's camera resolution (fleet.data.correction.IMAGE_SHAPE)


@dataclass(frozen=True)
class GymMapping:
    """How one gymnasium env's observations become a fleet observation."""

    instruction: str
    # what the robot is asked to do (the env has no text; it comes from config)
    image: str | None = None
    # observation key of an (H, W, 3) uint8 image, dotted for nested dicts ("pixels.top"); None = env.render()
    proprio: tuple[str, ...] = ()
    # observation keys concatenated into proprio; empty = the whole (Box) observation
    control_hz: float = 10.0
    # the env's step rate
    success_key: str = "is_success"
    # info key that says the episode succeeded; without it, a terminated episode with reward > 0 did
    force_key: str | None = None
    # info key of a force/torque reading (its norm counts), None = no sensor
    max_force: float = 1e9
    # force norm that trips the e-stop (with force_key)
    velocity_share: float = 0.5
    # max_velocity = this share of each action range per control period (how far one action may move)
    stop_action: tuple[float, ...] | None = None
    # the hold command (zeros for velocity commands); None = repeat the last command
    extra: dict = field(default_factory=dict)
    # free-form notes kept with the mapping (e.g. the env id)

    def __post_init__(self) -> None:
        check_str("GymMapping.instruction", self.instruction)
        check_number("GymMapping.control_hz", self.control_hz, lo=0.1, hi=1000, expected="a rate in (0, 1000] Hz")
        check_number("GymMapping.velocity_share", self.velocity_share, lo=1e-6, hi=1e6, expected="a positive share")
        if self.image is not None:
            check_str("GymMapping.image", self.image)
        if isinstance(self.proprio, str) or not all(isinstance(k, str) and k for k in self.proprio):
            raise ValueError(f"GymMapping.proprio: expected a tuple of observation keys, got {self.proprio!r}")


def _lookup(obs, key: str, what: str):
    value = obs
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"GymMapping.{what}: observation has no {key!r} (keys: {_keys(obs)})")
        value = value[part]
    return value


def _keys(obs) -> list[str]:
    if not isinstance(obs, dict):
        return []
    out = []
    for k, v in obs.items():
        out += [f"{k}.{sub}" for sub in _keys(v)] if isinstance(v, dict) else [k]
    return out


def resize_image(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by nearest pixel (no image library in the robot process)."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"camera image: expected (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.dtype.kind == "f" and img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    rows = (np.arange(size) * img.shape[0] / size).astype(np.intp)
    cols = (np.arange(size) * img.shape[1] / size).astype(np.intp)
    return np.ascontiguousarray(img[rows][:, cols, :3])


def _proprio(obs, mapping: GymMapping) -> np.ndarray:
    if mapping.proprio:
        parts = [np.asarray(_lookup(obs, k, "proprio"), np.float32).reshape(-1) for k in mapping.proprio]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.asarray(obs, np.float32).reshape(-1)


def gym_embodiment(name: str, env, mapping: GymMapping, chunk_size: int = 16, recompute_every: int = 4, **kw):
    """The EmbodimentSpec of `env` under `mapping`: action bounds from its Box action space, proprio size from a
    reset observation, velocity bounds from `velocity_share`. Extra keywords go to EmbodimentSpec (head, ...)."""
    space = env.action_space
    low, high = np.asarray(space.low, np.float64).reshape(-1), np.asarray(space.high, np.float64).reshape(-1)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ValueError(f"{name}: the env's action space must be a bounded Box, got {space}")
    obs, _ = env.reset(seed=0)
    proprio_dim = int(_proprio(obs, mapping).size)
    return EmbodimentSpec(
        name=name,
        action_dim=int(low.size),
        head=kw.pop("head", "flow"),
        proprio_dim=max(1, proprio_dim),
        action_low=tuple(low),
        action_high=tuple(high),
        max_velocity=tuple((high - low) * mapping.velocity_share * mapping.control_hz),
        max_force=mapping.max_force,
        control_hz=mapping.control_hz,
        chunk_size=chunk_size,
        recompute_every=recompute_every,
        stop_action=mapping.stop_action,
        description=kw.pop("description", f"gymnasium env {env.spec.id if env.spec else type(env).__name__}"),
        **kw,
    )


class GymRobot(Robot):
    """A gymnasium env as a robot body, through `mapping`. One env.step per command."""

    def __init__(self, env, embodiment: str, mapping: GymMapping, clock: Callable[[], float] = time.monotonic):
        self.env, self.mapping, self.clock = env, mapping, clock
        self.spec = get_embodiment(embodiment)
        self.name = embodiment
        self._connected = False
        self._obs = None
        self._info: dict = {}
        self._reward = 0.0
        self._done = self._success = False
        self._last: np.ndarray | None = None
        self._dtype = getattr(env.action_space, "dtype", np.float32) or np.float32
        self._shape = getattr(env.action_space, "shape", (self.spec.action_dim,))

    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        return {"image": (IMAGE_SIZE, IMAGE_SIZE, 3), "proprio": (self.spec.proprio_dim,)}

    @property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(self.spec.dim_names, float)

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False
        close = getattr(self.env, "close", None)
        if close is not None:
            close()

    def _world(self):
        if self._obs is None:
            raise RuntimeError(f"{self.name}: the task has not started an episode (GymTask.reset)")
        return self._obs

    def read_camera(self) -> tuple[np.ndarray, float]:
        self._check_connected()
        if self.mapping.image is None:
            img = self.env.render()
        else:
            img = _lookup(self._world(), self.mapping.image, "image")
        return resize_image(img), self.clock()

    def read_proprio(self) -> tuple[np.ndarray, float]:
        self._check_connected()
        p = _proprio(self._world(), self.mapping)
        out = np.zeros(self.spec.proprio_dim, np.float32)
        out[: min(p.size, out.size)] = p[: out.size]
        return np.clip(np.nan_to_num(out), -1e6, 1e6), self.clock()

    def read_force(self) -> float:
        if self.mapping.force_key is None:
            return 0.0
        f = np.asarray(self._info.get(self.mapping.force_key, 0.0), np.float64)
        return float(np.sqrt(np.sum(f * f)))

    def hold_action(self) -> np.ndarray | None:
        if self.spec.stop_action is not None:
            return np.asarray(self.spec.stop_action, np.float32)
        return None if self._last is None else self._last.copy()

    def send_action(self, action) -> np.ndarray:
        self._check_connected()
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape != (self.spec.action_dim,) or not np.isfinite(a).all():
            raise ValueError(f"{self.name} action: expected {self.spec.action_dim} finite numbers, got {a}")
        sent = np.clip(a, self.spec.action_low, self.spec.action_high).astype(self._dtype)
        self._last = sent.astype(np.float32)
        if self._done:
            return self._last.copy()
        obs, reward, term, trunc, info = self.env.step(sent.reshape(self._shape))
        self._obs, self._info, self._reward = obs, dict(info), float(reward)
        self._done = bool(term or trunc)
        key = self.mapping.success_key
        self._success = bool(info[key]) if key in info else bool(term and reward > 0)
        return self._last.copy()


class GymTask(Task):
    """A gymnasium env's episodes: the instruction from the mapping, success from `info` (or a rewarded
    termination), resets by env.reset(seed). `demonstrator(robot, n) -> (n, D)` stands in for the human at the
    robot (a scripted expert, a teleop device); without one, nobody corrects the policy."""

    def __init__(self, robot: GymRobot, demonstrator: Callable[[GymRobot, int], np.ndarray] | None = None) -> None:
        self.robot, self.demonstrator = robot, demonstrator

    @property
    def instruction(self) -> str:
        return self.robot.mapping.instruction

    def reset(self, seed: int) -> None:
        obs, info = self.robot.env.reset(seed=int(seed) % (2**31))
        r = self.robot
        r._obs, r._info, r._done, r._success, r._reward = obs, dict(info), False, False, 0.0

    def status(self) -> EpisodeStatus:
        return EpisodeStatus(self.robot._done, self.robot._success)

    def demonstrate(self, n: int) -> np.ndarray | None:
        if self.demonstrator is None:
            return None
        chunk = np.asarray(self.demonstrator(self.robot, n), np.float32)
        if chunk.shape != (n, self.robot.spec.action_dim) or not np.isfinite(chunk).all():
            raise ValueError(
                f"demonstrator: expected a finite ({n}, {self.robot.spec.action_dim}) chunk, got {chunk.shape}"
            )
        return chunk


def gym_robot(env, embodiment: str, mapping: GymMapping, demonstrator=None, clock=time.monotonic):
    """(robot, task) over one gymnasium env, connected."""
    robot = GymRobot(env, embodiment, mapping, clock)
    robot.connect()
    return robot, GymTask(robot, demonstrator)


__all__ = ["GymMapping", "GymRobot", "GymTask", "gym_embodiment", "gym_robot", "resize_image"]
