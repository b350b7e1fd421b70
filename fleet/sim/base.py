"""Shared machinery of the simulated embodiments: spaces, shifts, action validation, expert chunks.

A subclass supplies the task: `_sample_state(rng)` (a dict of numpy arrays and scalars),
`_advance(state, executed) -> (force, success)` (pure dynamics, no rendering), `_render(state)`,
`_proprio(state)`, and `_expert(state) -> desired executed action`. The base class keeps dynamics
apart from rendering so the teleoperator can look ahead on a copy of the state cheaply.
"""

from __future__ import annotations

import copy
import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import fleet.sim.render as render
from fleet.embodiments import EmbodimentSpec, get_embodiment

SHIFTS: tuple[str, ...] = ("novel_object", "lighting", "camera_offset", "distractors", "actuator_bias")

INSTRUCTION_CHARSET = string.ascii_lowercase + " "


def parse_shift(shift: str | list[str] | tuple[str, ...] | frozenset[str] | None) -> frozenset[str]:
    """'novel_object+lighting', 'a,b', a list, or None -> a set of known shift names."""
    if shift is None or shift == "" or shift == "none":
        return frozenset()
    if isinstance(shift, str):
        parts = [p.strip() for p in shift.replace(",", "+").split("+") if p.strip()]
    else:
        parts = list(shift)
    unknown = [p for p in parts if p not in SHIFTS]
    if unknown:
        raise ValueError(f"shift: unknown name(s) {unknown}; known shifts are {list(SHIFTS)}")
    return frozenset(parts)


class FleetEnv(gym.Env):
    """Base class of the four simulated robots. Observation: image, proprio, instruction."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    embodiment: str = ""
    # calibration offset added to every executed action under the `actuator_bias` shift, as after a
    # hardware revision; fixed per embodiment so every robot of that body is off the same way
    actuator_bias: tuple[float, ...] = ()
    lighting = (0.55, (40.0, 25.0, -10.0))  # (gain, rgb tint) of the `lighting` shift
    camera_shift = (4, -3)  # whole pixels (dx, dy) of the `camera_offset` shift

    def __init__(self, seed: int | None = None, shift=None, render_mode: str | None = "rgb_array"):
        self.embodiment_spec: EmbodimentSpec = get_embodiment(self.embodiment)
        spec = self.embodiment_spec
        self.shifts = parse_shift(shift)
        self.render_mode = render_mode
        self._low = np.asarray(spec.action_low, dtype=np.float32)
        self._high = np.asarray(spec.action_high, dtype=np.float32)
        self.action_space = spaces.Box(self._low, self._high, dtype=np.float32)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (render.SIZE, render.SIZE, 3), dtype=np.uint8),
                "proprio": spaces.Box(-10.0, 10.0, (spec.proprio_dim,), dtype=np.float32),
                "instruction": spaces.Text(max_length=64, min_length=1, charset=INSTRUCTION_CHARSET),
            }
        )
        bias = np.zeros(spec.action_dim, dtype=np.float32)
        if "actuator_bias" in self.shifts:
            bias[:] = self.actuator_bias
        self.bias = bias
        self._init_seed = seed
        self._state: dict[str, Any] | None = None
        self._t = 0
        self._last_image: np.ndarray | None = None

    # ---- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None and self._init_seed is not None and self._state is None:
            seed = self._init_seed
        super().reset(seed=seed)
        self._state = self._sample_state(self.np_random)
        self._t = 0
        obs = self._observe()
        return obs, {"is_success": False, "force": 0.0, "t": 0}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("step() called before reset()")
        a = self.validate_action(action)
        executed = np.clip(a + self.bias, self._low, self._high)
        force, success = self._advance(self._state, executed)
        self._t += 1
        truncated = self._t >= self.embodiment_spec.max_episode_steps and not success
        obs = self._observe()
        info = {"is_success": bool(success), "force": float(force), "t": self._t, "executed_action": executed}
        return obs, 0.0 + float(success), bool(success), bool(truncated), info

    def render(self) -> np.ndarray:
        if self._last_image is None:
            raise RuntimeError("render() called before reset()")
        return self._last_image

    # ---- validation ----------------------------------------------------------------------------
    def validate_action(self, action) -> np.ndarray:
        """Return the action as float32 (D,), or raise ValueError naming the problem. No state changes."""
        d = self.embodiment_spec.action_dim
        try:
            raw = np.asarray(action)
            if raw.dtype.kind not in "biuf":
                raise TypeError(raw.dtype)
            a = raw.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{self.embodiment} action: expected shape ({d},) of numbers, got {type(action).__name__}"
            ) from exc
        if a.shape != (d,):
            raise ValueError(f"{self.embodiment} action: expected shape ({d},), got {a.shape}")
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{self.embodiment} action: non-finite value at dims {np.flatnonzero(bad).tolist()}")
        tol = 1e-6 * (self._high - self._low)
        out = (a < self._low - tol) | (a > self._high + tol)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise ValueError(
                f"{self.embodiment} action: dim {i} ({self.embodiment_spec.dim_names[i]}) = {a[i]:.4g} "
                f"outside [{self._low[i]:.4g}, {self._high[i]:.4g}]"
            )
        return np.clip(a, self._low, self._high)

    # ---- the expert ----------------------------------------------------------------------------
    def expert_action(self) -> np.ndarray:
        """The privileged scripted expert's next action (float32 (D,)); it knows the actuator bias."""
        if self._state is None:
            raise RuntimeError("expert_action() called before reset()")
        return self._command_for(self._expert(self._state))

    def expert_chunk(self, n: int | None = None, prefix: np.ndarray | None = None) -> np.ndarray:
        """The expert's next `n` actions (n, D), looked ahead on a copy of the state; the env is unchanged.
        prefix: (k, D) commands that will run first (k <= n): the chunk starts with them and the expert plans the
        rest from where they lead (a perfect real-time-chunking continuation)."""
        if self._state is None:
            raise RuntimeError("expert_chunk() called before reset()")
        n = self.embodiment_spec.chunk_size if n is None else int(n)
        first = np.zeros((0, self.embodiment_spec.action_dim), np.float32) if prefix is None else np.asarray(prefix)
        if first.ndim != 2 or first.shape[1] != self.embodiment_spec.action_dim or len(first) > n:
            raise ValueError(f"prefix: expected (k <= {n}, {self.embodiment_spec.action_dim}), got {first.shape}")
        state = copy.deepcopy(self._state)
        out = np.empty((n, self.embodiment_spec.action_dim), dtype=np.float32)
        for i in range(n):
            out[i] = first[i] if i < len(first) else self._command_for(self._expert(state))
            self._advance(state, np.clip(out[i] + self.bias, self._low, self._high))
        return out

    def hold_action(self) -> np.ndarray:
        """(D,) float32: the command that keeps the body where it is now: the body's stop command for velocity and
        delta commands, else (position targets) its measured pose as a command (`_hold_pose`)."""
        if self._state is None:
            raise RuntimeError("hold_action() called before reset()")
        stop = self.embodiment_spec.stop_action
        if stop is not None:
            return np.asarray(stop, np.float32)
        return self._command_for(self._hold_pose(self._state))

    def _hold_pose(self, state: dict) -> np.ndarray:
        """Position-target bodies: the executed action that holds the current pose."""
        raise NotImplementedError(f"{self.embodiment}: no stop_action and no _hold_pose")

    def _command_for(self, desired_executed: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(desired_executed, dtype=np.float32) - self.bias, self._low, self._high)

    @property
    def t(self) -> int:
        return self._t

    @property
    def instruction(self) -> str:
        return self._state["instruction"] if self._state else ""

    def focus(self) -> np.ndarray:
        """Privileged: where in the camera image the thing the instruction names lies, as (x, y) in
        [-1, 1] image coordinates (x right, y down; a pixel's centre i + 0.5 maps to 2 (i + 0.5) / 64 - 1).
        Pretraining uses it as an auxiliary target so the vision encoder learns to find the named object;
        policies never see it."""
        if self._state is None:
            raise RuntimeError("focus() before reset()")
        px, py = self._focus_px(self._state)
        if "camera_offset" in self.shifts:
            px, py = px + self.camera_shift[0], py + self.camera_shift[1]
        return np.array([px, py], np.float32) * (2.0 / render.SIZE) - 1.0

    # ---- observation ---------------------------------------------------------------------------
    def _observe(self) -> dict:
        img = self._render(self._state)
        if "distractors" in self.shifts:
            self._draw_distractors(img, self._state)
        if "lighting" in self.shifts:
            gain, tint = self.lighting
            img = render.apply_lighting(img, gain, tint)
        if "camera_offset" in self.shifts:
            img = render.apply_offset(img, *self.camera_shift)
        self._last_image = img
        proprio = np.clip(self._proprio(self._state).astype(np.float32), -10.0, 10.0)
        return {"image": img, "proprio": proprio, "instruction": self._state["instruction"]}

    def _draw_distractors(self, img: np.ndarray, state: dict) -> None:
        """Small clutter that is no part of the task, placed once per episode."""
        for x, y, r, col in state["distractors"]:
            render.cross(img, x, y, r, col, width=1.0)

    @staticmethod
    def _sample_distractors(rng: np.random.Generator, n: int = 3) -> list:
        cols = [(90, 60, 30), (200, 200, 200), (20, 90, 90), (120, 120, 30)]
        return [
            (float(rng.uniform(4, 60)), float(rng.uniform(4, 60)), float(rng.uniform(2.0, 3.5)), cols[i % len(cols)])
            for i in range(n)
        ]

    # ---- subclass hooks ------------------------------------------------------------------------
    def _sample_state(self, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def _advance(self, state: dict, executed: np.ndarray) -> tuple[float, bool]:
        raise NotImplementedError

    def _render(self, state: dict) -> np.ndarray:
        raise NotImplementedError

    def _proprio(self, state: dict) -> np.ndarray:
        raise NotImplementedError

    def _expert(self, state: dict) -> np.ndarray:
        raise NotImplementedError

    def _focus_px(self, state: dict) -> tuple[float, float]:
        """Pixel coordinates of the instructed object (see `focus`)."""
        raise NotImplementedError
