"""The two things a fleet robot is made of (numpy only): the `Robot` (the body: sensors in, commands out) and
the `Task` (the world and the people around it: instruction, success, episode resets, demonstrations).

`Robot` follows LeRobot's `Robot` names and meaning, so a LeRobot robot plugin or a ROS driver is wrapped by a
thin adapter (no `lerobot` import: its torch pin conflicts with ours):

    robot.connect()                      # open the hardware (or the simulator)
    robot.observation_features           # {"image": (64, 64, 3), "proprio": (8,)} : what get_observation gives
    robot.action_features                # {"dx": float, ..., "gripper": float} : one entry per action dim
    obs = robot.get_observation()        # {"image", "proprio", "image_t", "proprio_t"} (timestamps, seconds)
    sent = robot.send_action(action)     # (D,) -> the action actually sent (after the body's own clipping)
    robot.disconnect()

Two differences from LeRobot, both on purpose: actions cross as one (D,) float array in `action_features`
order (the fleet's policy and safety layer speak arrays), and the multi-rate runtime reads the sensors
separately (`read_camera`, `read_proprio`, `read_force`, each with its timestamp) because a camera at 30 Hz and
joint encoders at 100 Hz are separate devices. `get_observation()` is both at once.

Task outcome does not come from the robot: a sim reports success and resets its world, on hardware an operator
or a success detector does. The (scripted) teleoperator reaches the world through `Task.demonstrate`, never
through a simulator's internals: in simulation that is the privileged scripted expert, which reads world state
(object poses) no robot sensor sees, so it belongs to the task side; on hardware it is the human's leader arm.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


class RobotNotConnectedError(RuntimeError):
    """A robot method that needs the hardware was called before connect() or after disconnect()."""


class Robot(abc.ABC):
    """One robot body. Timestamps are seconds on the clock the robot was given (the runtime's clock)."""

    name: str = "robot"
    # the embodiment this body is registered as (fleet.embodiments)

    @property
    @abc.abstractmethod
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        """Shapes of what get_observation() returns: {"image": (H, W, 3) uint8, "proprio": (P,) float32}."""

    @property
    @abc.abstractmethod
    def action_features(self) -> dict[str, type]:
        """One entry per action dimension, in the order of the (D,) arrays send_action takes."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool: ...

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the body; a connected robot is ready for get_observation / send_action."""

    @abc.abstractmethod
    def disconnect(self) -> None: ...

    @abc.abstractmethod
    def read_camera(self) -> tuple[np.ndarray, float]:
        """(image (H, W, 3) uint8, capture timestamp): the newest frame."""

    @abc.abstractmethod
    def read_proprio(self) -> tuple[np.ndarray, float]:
        """(proprio (P,) float32, timestamp): the newest joint / base state."""

    @abc.abstractmethod
    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Command (D,) float; returns the action actually sent (LeRobot: "always returns the action sent")."""

    def read_force(self) -> float:
        """Measured force/torque norm (N), read at the controller rate; 0.0 for a body without a sensor."""
        return 0.0

    def hold_action(self) -> np.ndarray | None:
        """(D,) the command that keeps the body where it is now (its measured pose for position targets, the
        stop command for velocity ones), None if unknown. The safety layer starts each episode from it, so the
        first command is rate-limited from where the robot really is, not from a default pose."""
        return None

    @property
    def command_hz(self) -> float | None:
        """How often the body takes setpoints; None = once per policy action (the controller passes through)."""
        return None

    @property
    def workspace_guard(self):
        """The body's own task-space wall for the safety layer, or None: guard(action (D,), proprio (P,)) -> (D,),
        a step no larger than the action's, for limits per-dimension walls cannot state (a fingertip above the
        table, through the arm's forward kinematics). fleet.control.SafetyConfig.workspace_guard."""
        return None

    def get_observation(self) -> dict:
        """{"image", "image_t", "proprio", "proprio_t"}: both sensors now."""
        self._check_connected()
        image, image_t = self.read_camera()
        proprio, proprio_t = self.read_proprio()
        return {"image": image, "image_t": image_t, "proprio": proprio, "proprio_t": proprio_t}

    def _check_connected(self) -> None:
        if not self.is_connected:
            raise RobotNotConnectedError(f"{self.name}: call connect() first")


@dataclass(frozen=True)
class EpisodeStatus:
    """The task's verdict after the latest command."""

    done: bool
    # the episode is over (success, failure, time limit)
    success: bool
    # it ended in success (meaningful when done)


class Task(abc.ABC):
    """The world around one robot: what to do, whether it worked, the next episode, a demonstrator."""

    @property
    @abc.abstractmethod
    def instruction(self) -> str:
        """What the robot is asked to do this episode (the policy's text input)."""

    @abc.abstractmethod
    def reset(self, seed: int) -> None:
        """Start a new episode (a sim re-samples its world; on hardware an operator re-arranges the scene)."""

    @abc.abstractmethod
    def status(self) -> EpisodeStatus:
        """Whether the episode is over, and how it went."""

    def demonstrate(self, n: int) -> np.ndarray | None:
        """(n, D) float32: what a demonstrator would command from now on, None when no one can (no human at
        the robot, no privileged expert). The operator's corrections come from here."""
        return None
