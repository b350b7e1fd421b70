"""leap: a dexterous hand shapes the grasp the object in view calls for.

Action: 24 absolute targets (16 finger joints, 4 per finger, then 8 wrist/arm dims) that the hand
tracks with a first-order lag. Each object calls for a grasp type (power, pinch, tripod) whose
finger closure depends on the object's size, and the wrist must match the object's orientation
and position in the image. Success: every joint within `TOLERANCE` of the grasp the object calls for.
"""

from __future__ import annotations

import numpy as np

import fleet.sim.render as render
from fleet.sim.base import FleetEnv

TOLERANCE = 0.1
LAG = 0.5  # fraction of the remaining error the hand closes per tick

# object -> (grasp type, drawn shape, colour, drawn radius in pixels at size 1)
OBJECTS: dict[str, tuple[str, str, str, float]] = {
    "ball": ("power", "disk", "red", 9.0),
    "can": ("power", "box", "blue", 8.0),
    "bottle": ("power", "bar", "green", 10.0),
    "pen": ("pinch", "thin", "blue", 11.0),
    "card": ("pinch", "flat", "yellow", 9.0),
    "coin": ("pinch", "disk", "yellow", 4.0),
    "marble": ("tripod", "disk", "green", 5.0),
    "egg": ("tripod", "egg", "yellow", 6.5),
    "block": ("tripod", "box", "red", 5.5),
    # novel: never shown in pretraining (novel words, novel colours)
    "apple": ("power", "disk", "pink", 8.5),
    "key": ("pinch", "thin", "orange", 7.0),
    "disk": ("tripod", "ring", "purple", 6.0),
}
TRAIN_OBJECTS = ("ball", "can", "bottle", "pen", "card", "coin", "marble", "egg", "block")
NOVEL_OBJECTS = ("apple", "key", "disk")

# finger joint closure per grasp type: (thumb, index, middle, ring) x 4 joints
_FINGERS = {
    "power": np.array([[1.0, 1.1, 0.9, 0.7], [1.3, 1.3, 1.2, 1.0], [1.3, 1.3, 1.2, 1.0], [1.3, 1.3, 1.2, 1.0]]),
    "pinch": np.array([[1.2, 0.9, 0.7, 0.5], [1.1, 0.8, 0.6, 0.4], [0.2, 0.2, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]),
    "tripod": np.array([[1.0, 0.8, 0.8, 0.6], [1.0, 0.9, 0.8, 0.6], [1.0, 0.9, 0.8, 0.6], [0.3, 0.3, 0.2, 0.2]]),
}
_WRIST_PITCH = {"power": 0.3, "pinch": -0.2, "tripod": 0.05}


def grasp_target(obj: str, size: float, angle: float, offset: tuple[float, float]) -> np.ndarray:
    """The 24 joint and wrist targets object `obj` calls for (size ~0.8-1.2, angle rad, offset px/20)."""
    kind = OBJECTS[obj][0]
    # bigger objects need a wider aperture: fingers curl less
    fingers = np.clip(_FINGERS[kind] - 0.5 * (size - 1.0), 0.0, 1.6).reshape(-1)
    wrist = np.zeros(8)
    wrist[0] = angle
    wrist[1] = _WRIST_PITCH[kind]
    wrist[2], wrist[3] = offset
    wrist[4] = {"power": 0.3, "pinch": -0.3, "tripod": 0.0}[kind]
    return np.concatenate([fingers, wrist])


class LeapEnv(FleetEnv):
    embodiment = "leap"
    actuator_bias = tuple([-0.15] * 16 + [0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    def _sample_state(self, rng: np.random.Generator) -> dict:
        pool = NOVEL_OBJECTS if "novel_object" in self.shifts else TRAIN_OBJECTS
        obj = str(rng.choice(pool))
        size = float(rng.uniform(0.8, 1.2))
        angle = float(rng.uniform(-0.5, 0.5))
        if OBJECTS[obj][1] in ("disk", "ring"):
            angle = 0.0  # a round object looks the same at every angle: its grasp needs no wrist roll
        offset = (float(rng.uniform(-0.4, 0.4)), float(rng.uniform(-0.4, 0.4)))
        q = np.concatenate([rng.uniform(0.0, 0.3, size=16), rng.uniform(-0.1, 0.1, size=8)])
        return {
            "q": q,
            "object": obj,
            "size": size,
            "angle": angle,
            "offset": offset,
            "goal": grasp_target(obj, size, angle, offset),
            "instruction": f"grasp the {obj}",
            "distractors": self._sample_distractors(rng),
        }

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        s["q"] = s["q"] + LAG * (a.astype(np.float64) - s["q"])
        # squeezing past the object's surface shows up as contact force on the fingertips
        over = np.clip(s["q"][:16] - (s["goal"][:16] + 0.25), 0.0, None)
        force = float(60.0 * over.sum())
        success = float(np.abs(s["q"] - s["goal"]).max()) < TOLERANCE
        return force, bool(success)

    def _hold_pose(self, s: dict) -> np.ndarray:
        return s["q"].astype(np.float32)  # a target at the current joints: the lag leaves the hand where it is

    def _expert(self, s: dict) -> np.ndarray:
        return s["goal"].astype(np.float32)

    def _proprio(self, s: dict) -> np.ndarray:
        return s["q"]

    def _focus_px(self, s: dict) -> tuple[float, float]:
        return 32 + 20 * s["offset"][0], 32 - 20 * s["offset"][1]

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((40, 45, 50))
        render.disk(img, 32, 32, 26, (90, 100, 105))
        kind, drawn, color, radius = OBJECTS[s["object"]]
        r = radius * s["size"]
        cx, cy = 32 + 20 * s["offset"][0], 32 - 20 * s["offset"][1]
        col, ang = render.PALETTE[color], -s["angle"]
        if drawn == "disk":
            render.disk(img, cx, cy, r, col)
        elif drawn == "ring":
            render.ring(img, cx, cy, r, col, inner=0.5)
        elif drawn == "box":
            render.box(img, cx, cy, r * 0.8, r * 0.8, ang, col)
        elif drawn == "bar":
            render.box(img, cx, cy, r, r * 0.45, ang, col)
        elif drawn == "thin":
            render.box(img, cx, cy, r, 1.2, ang, col)
        elif drawn == "flat":
            render.box(img, cx, cy, r, r * 0.6, ang, col)
        else:  # egg
            render.box(img, cx, cy, r * 0.8, r * 0.6, ang, col)
            render.disk(img, cx + np.cos(ang) * r * 0.5, cy + np.sin(ang) * r * 0.5, r * 0.6, col)
        # the hand's current closure, as a bar along the bottom edge the policy can also read
        closure = float(np.clip(s["q"][:16].mean() / 1.6, 0, 1))
        render.box(img, 4 + 28 * closure, 61, 28 * closure + 0.5, 1.5, 0.0, (230, 230, 230))
        return img
