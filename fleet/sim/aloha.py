"""aloha: two arms grasp the two ends of the named bar (of two on the table) and lift it together.

Action: two 7-vectors (left arm, right arm), each an end-effector delta pose plus gripper. The left
arm takes the bar's left end (smaller x), the right arm the right end; success is both ends held
with both grippers above `LIFT_HEIGHT`.
"""

from __future__ import annotations

import numpy as np

import fleet.sim.render as render
from fleet.sim.base import FleetEnv
from fleet.sim.franka import (
    GRASP_HEIGHT,
    GRASP_RADIUS,
    LIFT_HEIGHT,
    SCALE,
    arm_expert,
    arm_step,
    draw_gripper,
    to_px,
)

HALF_LENGTH = 0.08
HALF_WIDTH = 0.015


def bar_ends(bar: dict) -> tuple[np.ndarray, np.ndarray]:
    """(left end, right end) of a bar, left meaning smaller x."""
    c = np.array(bar["center"])
    d = HALF_LENGTH * np.array([np.cos(bar["angle"]), np.sin(bar["angle"])])
    a, b = c - d, c + d
    return (a, b) if a[0] <= b[0] else (b, a)


class AlohaEnv(FleetEnv):
    embodiment = "aloha"
    actuator_bias = (0.015, 0.015, 0.0, 0.0, 0.0, 0.0, 0.0, -0.015, 0.012, 0.0, 0.0, 0.0, 0.0, 0.0)

    def _sample_state(self, rng: np.random.Generator) -> dict:
        colors = [str(c) for c in rng.permutation(render.TRAIN_COLORS)[:2]]
        target = int(rng.integers(2))
        if "novel_object" in self.shifts:
            colors[target] = str(rng.choice(render.NOVEL_COLORS))
        ys = [rng.uniform(0.06, 0.16), rng.uniform(-0.16, -0.06)]
        bars = [
            {"center": (float(rng.uniform(-0.08, 0.08)), float(y)), "angle": float(rng.uniform(-0.5, 0.5)), "color": c}
            for y, c in zip(ys, colors, strict=True)
        ]
        arms = []
        for side in (-1.0, 1.0):
            ee = np.array([side * rng.uniform(0.14, 0.22), rng.uniform(-0.1, 0.1), rng.uniform(0.08, 0.16)])
            arms.append({"ee": ee, "rpy": rng.uniform(-0.2, 0.2, size=3), "grip": 0.0, "holding": False})
        return {
            "arms": arms,
            "bars": bars,
            "target": target,
            "instruction": f"lift the {colors[target]} bar with both arms",
            "distractors": self._sample_distractors(rng),
        }

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        ends = bar_ends(s["bars"][s["target"]])
        force = 0.0
        for k, arm in enumerate(s["arms"]):
            arm["ee"], arm["rpy"], arm["grip"], f, closed_now = arm_step(
                arm["ee"], arm["rpy"], arm["grip"], a[7 * k : 7 * k + 7]
            )
            force = max(force, f)
            if not arm["holding"] and closed_now and arm["ee"][2] < GRASP_HEIGHT:
                arm["holding"] = bool(np.hypot(*(ends[k] - arm["ee"][:2])) < GRASP_RADIUS)
            if arm["holding"] and arm["grip"] < 0.3:
                arm["holding"] = False
        both = all(arm["holding"] for arm in s["arms"])
        success = both and all(arm["ee"][2] > LIFT_HEIGHT for arm in s["arms"])
        return force, bool(success)

    def _expert(self, s: dict) -> np.ndarray:
        ends = bar_ends(s["bars"][s["target"]])
        both = all(arm["holding"] for arm in s["arms"])
        return np.concatenate(
            [
                arm_expert(arm["ee"], arm["rpy"], arm["grip"], arm["holding"], ends[k], lift=both)
                for k, arm in enumerate(s["arms"])
            ]
        )

    def _proprio(self, s: dict) -> np.ndarray:
        return np.concatenate(
            [np.concatenate([a["ee"], a["rpy"], [a["grip"], float(a["holding"])]]) for a in s["arms"]]
        )

    def _focus_px(self, s: dict) -> tuple[float, float]:
        if all(a["holding"] for a in s["arms"]):
            c = (s["arms"][0]["ee"][:2] + s["arms"][1]["ee"][:2]) / 2
        else:
            c = np.asarray(s["bars"][s["target"]]["center"])
        return to_px(c[0], c[1])

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((70, 70, 80))
        render.box(img, 32, 32, 29, 29, 0.0, (120, 125, 135))
        for i, bar in enumerate(s["bars"]):
            held = i == s["target"] and all(a["holding"] for a in s["arms"])
            if held:
                p, q = s["arms"][0]["ee"][:2], s["arms"][1]["ee"][:2]
                c, ang = (p + q) / 2, float(np.arctan2(q[1] - p[1], q[0] - p[0]))
            else:
                c, ang = np.array(bar["center"]), bar["angle"]
            cx, cy = to_px(c[0], c[1])
            render.box(img, cx, cy, HALF_LENGTH * SCALE, HALF_WIDTH * SCALE, -ang, render.PALETTE[bar["color"]])
        for k, arm in enumerate(s["arms"]):
            draw_gripper(img, arm["ee"], arm["grip"], None, -1, color=(15, 15, 15) if k == 0 else (245, 245, 245))
        return img
