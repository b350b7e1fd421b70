"""Our simulators behind the `Robot` and `Task` interfaces: `SimRobot` is the body (camera, proprio, force,
commands), `SimTask` the world (instruction, success, resets, the privileged expert as demonstrator). Both share
one `fleet.sim` env; nothing else in the robot stack touches it.

Setpoints: a sim advances once per control period (its dynamics are written per policy action). With a
controller at a higher command rate, `SimRobot(substeps=k)` integrates the k setpoints of one control period
and steps the world once with their mean: exact for the delta-pose and velocity commands of franka, aloha and
hello (the period's displacement is the mean command), a zero-order average for leap's position targets.
`substeps=1` is the pass-through (one setpoint per control period, the single-rate loop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from fleet.embodiments import get_embodiment
from fleet.robot.interface import EpisodeStatus, Robot, Task
from fleet.validate import check_int


class SimRobot(Robot):
    """A `fleet.sim` env as a robot body. `clock` stamps the readings (the runtime's clock)."""

    def __init__(self, env, clock: Callable[[], float] = time.monotonic, substeps: int = 1, phase: float = 0.0) -> None:
        """phase in [0, 1): the world's steps fall that share of a control period later, so robots sharing a
        scheduler do not all step their worlds (the costly part: dynamics and rendering) in the same period."""
        self.env = env
        self.sim = env.unwrapped
        self.spec = get_embodiment(self.sim.embodiment)
        self.name = self.spec.name
        self.clock = clock
        self.substeps = check_int("SimRobot.substeps", substeps, lo=1, expected="a positive int")
        self._connected = False
        self._obs: dict | None = None
        self._info: dict = {}
        self._done = False
        self._sum = [0.0] * self.spec.action_dim
        self._offset = int(phase * substeps) % substeps
        self._count = self._offset
        self._n = 0
        self._low = np.asarray(self.spec.action_low, np.float32)
        self._high = np.asarray(self.spec.action_high, np.float32)
        self._lo, self._hi = list(self.spec.action_low), list(self.spec.action_high)
        self.world_steps = 0

    # ---- Robot ---------------------------------------------------------------------------------
    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        space = self.sim.observation_space
        return {"image": tuple(space["image"].shape), "proprio": tuple(space["proprio"].shape)}

    @property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(self.spec.dim_names, float)

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def command_hz(self) -> float:
        return self.spec.control_hz * self.substeps

    @property
    def workspace_guard(self):
        """The simulator's own task-space wall, where it has one (so100's fingertip floor)."""
        return getattr(self.sim, "workspace_guard", None)

    def connect(self) -> None:
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False

    def read_camera(self) -> tuple[np.ndarray, float]:
        self._check_connected()
        return self._world()["image"], self.clock()

    def read_proprio(self) -> tuple[np.ndarray, float]:
        self._check_connected()
        return self._world()["proprio"], self.clock()

    def read_force(self) -> float:
        return float(self._info.get("force", 0.0))

    def hold_action(self) -> np.ndarray | None:
        return self.sim.hold_action() if self._obs is not None else None

    def send_action(self, action) -> np.ndarray:
        """One setpoint; every `substeps`-th steps the world with their mean. A finished episode's world no longer
        moves (the task resets it). Returns the setpoint as sent, float32 inside the workspace. Plain Python on
        the way in: at 1 kHz a numpy call per operation costs more than the arithmetic."""
        self._check_connected()
        vals = action if isinstance(action, list) else np.asarray(action, np.float64).reshape(-1).tolist()
        if len(vals) != self.spec.action_dim:
            raise ValueError(f"{self.name} action: expected shape ({self.spec.action_dim},), got {len(vals)} values")
        if not all(map(math.isfinite, vals)):
            raise ValueError(f"{self.name} action: non-finite value in {vals}")
        sent = [min(max(v, lo), hi) for v, lo, hi in zip(vals, self._lo, self._hi, strict=True)]
        if not self._done:
            acc = self._sum
            for i, v in enumerate(sent):
                acc[i] += v
            self._count += 1
            self._n += 1
            if self._count >= self.substeps:
                mean = np.asarray(acc, np.float32) / np.float32(self._n)
                self._sum = [0.0] * len(acc)
                self._count = self._n = 0
                mean = np.clip(mean, self._low, self._high)
                self._obs, _, term, trunc, self._info = self.env.step(mean)
                self.world_steps += 1
                self._done = bool(term or trunc)
        return np.asarray(sent, np.float32)

    # ---- for SimTask -----------------------------------------------------------------------------
    def _world(self) -> dict:
        if self._obs is None:
            raise RuntimeError(f"{self.name}: the task has not started an episode (SimTask.reset)")
        return self._obs

    def _on_reset(self, obs: dict, info: dict) -> None:
        self._obs, self._info, self._done = obs, dict(info), False
        self._sum = [0.0] * self.spec.action_dim
        self._count, self._n = self._offset, 0


class SimTask(Task):
    """The simulated world's side of a `SimRobot`: instruction, success and time limit, resets, the expert."""

    def __init__(self, robot: SimRobot) -> None:
        self.robot = robot
        self.sim = robot.sim

    @property
    def instruction(self) -> str:
        return self.sim.instruction

    def reset(self, seed: int) -> None:
        obs, info = self.robot.env.reset(seed=seed)
        self.robot._on_reset(obs, info)

    def status(self) -> EpisodeStatus:
        return EpisodeStatus(self.robot._done, bool(self.robot._info.get("is_success", False)))

    def demonstrate(self, n: int) -> np.ndarray:
        """The privileged scripted expert's next n actions, looked ahead on a copy of the world."""
        return self.sim.expert_chunk(n)


def sim_robot(
    env, clock: Callable[[], float] = time.monotonic, substeps: int = 1, phase: float = 0.0
) -> tuple[SimRobot, SimTask]:
    """(robot, task) over one `fleet.sim` env, connected."""
    robot = SimRobot(env, clock, substeps, phase)
    robot.connect()
    return robot, SimTask(robot)
