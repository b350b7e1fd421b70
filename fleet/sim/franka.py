"""franka: a 7-DOF arm picks up the named object among 2-4 on a table, seen from a top-down camera.

Action: end-effector delta (dx, dy, dz, droll, dpitch, dyaw) per tick plus a gripper command in
[-1, 1]. The gripper grasps an object when it closes within `GRASP_RADIUS` of it, low enough;
success is holding the named object above `LIFT_HEIGHT`.
"""

from __future__ import annotations

import numpy as np

import fleet.sim.render as render
from fleet.sim.base import FleetEnv

TABLE = 0.25  # the table spans [-TABLE, TABLE] in x and y (metres)
SCALE = render.SIZE / (2 * TABLE + 0.06)  # pixels per metre
OBJ_RADIUS = 0.03
GRASP_RADIUS = 0.03
GRASP_HEIGHT = 0.03
LIFT_HEIGHT = 0.12
HOVER = 0.08
# the expert descends within DESCEND_RADIUS of the object and closes within CLOSE_RADIUS, both inside
# GRASP_RADIUS: a policy that localizes the object to a pixel or two (~1-2 cm here) still grasps, where a
# 1.2 cm descent threshold made every such policy hover forever (its own estimate said "there", the
# expert's labels said "not yet")
DESCEND_RADIUS = 0.022
CLOSE_RADIUS = 0.024


def to_px(x: float, y: float) -> tuple[float, float]:
    return render.SIZE / 2 + x * SCALE, render.SIZE / 2 - y * SCALE


def arm_step(ee: np.ndarray, rpy: np.ndarray, grip: float, a: np.ndarray, lo: float = -TABLE) -> tuple:
    """Shared arm kinematics: returns new (ee, rpy, grip, force, closed_now). a = 7 executed numbers."""
    ee = ee + a[:3]
    force = 0.0
    if ee[2] < 0.0:
        # pushing into the table: the contact force grows with the commanded penetration
        force = 800.0 * -ee[2]
    ee[0] = min(max(ee[0], lo), -lo)
    ee[1] = min(max(ee[1], lo), -lo)
    ee[2] = min(max(ee[2], 0.0), 0.3)
    rpy = np.clip(rpy + a[3:6], -0.6, 0.6)
    target = (float(a[6]) + 1.0) / 2.0
    new_grip = grip + float(np.clip(target - grip, -0.34, 0.34))
    closed_now = grip <= 0.8 < new_grip
    return ee, rpy, new_grip, force, closed_now


def arm_expert(ee, rpy, grip, holding: bool, goal_xy, lift: bool, gain: float = 0.7) -> np.ndarray:
    """Scripted arm: hover over the goal, descend, close, lift. Returns the desired executed 7-vector."""
    out = np.zeros(7, dtype=np.float32)
    out[3:6] = np.clip(-rpy, -0.1, 0.1)
    if holding:
        out[2] = np.clip(LIFT_HEIGHT + 0.05 - ee[2], -0.05, 0.05) if lift else 0.0
        out[6] = 1.0
        return out
    err = np.asarray(goal_xy) - ee[:2]
    dist = float(np.hypot(*err))
    out[:2] = np.clip(gain * err, -0.05, 0.05)
    out[6] = -1.0
    if dist < CLOSE_RADIUS and ee[2] <= 0.02:
        out[6] = 1.0  # at the grasp pose: close (and keep closing while the fingers travel)
    elif grip > 0.3:
        # closed on nothing: open and back off upwards
        out[:2] = 0.0
        out[2] = 0.03
    elif dist > DESCEND_RADIUS:
        out[2] = np.clip(HOVER - ee[2], -0.05, 0.05)
    else:
        out[2] = np.clip(0.01 - ee[2], -0.05, 0.05)
    return out


def grasp_and_carry(s: dict, tip: np.ndarray, closing: bool) -> bool:
    """The table's grasp rules for a gripper at `tip` (3,): closing low enough within GRASP_RADIUS of an object
    grasps it, opening drops it, a held object follows the tip. Returns success: the named object held above
    LIFT_HEIGHT. (franka and so100 share the table.)"""
    if s["holding"] < 0 and closing and tip[2] < GRASP_HEIGHT:
        d = np.hypot(*(s["objects"][:, :2] - tip[:2]).T)
        i = int(np.argmin(d))
        if d[i] < GRASP_RADIUS:
            s["holding"] = i
    if s["holding"] >= 0:
        if s["grip"] < 0.3:
            s["objects"][s["holding"], 2] = 0.0
            s["holding"] = -1
        else:
            s["objects"][s["holding"]] = tip
    return bool(s["holding"] == s["target"] and tip[2] > LIFT_HEIGHT)


class FrankaEnv(FleetEnv):
    embodiment = "franka"
    actuator_bias = (0.02, -0.016, 0.0, 0.0, 0.0, 0.0, 0.0)

    def _sample_state(self, rng: np.random.Generator) -> dict:
        novel = "novel_object" in self.shifts
        n = int(rng.integers(2, 5))
        colors = list(rng.permutation(render.TRAIN_COLORS))[:n]
        shapes = [str(rng.choice(render.TRAIN_SHAPES)) for _ in range(n)]
        target = int(rng.integers(n))
        if novel:
            colors[target] = str(rng.choice(render.NOVEL_COLORS))
            shapes[target] = str(rng.choice(render.NOVEL_SHAPES))
        pos = []
        while len(pos) < n:
            p = rng.uniform(-TABLE + 0.04, TABLE - 0.04, size=2)
            if all(np.hypot(*(p - q)) > 0.1 for q in pos):
                pos.append(p)
        objects = np.zeros((n, 3))
        objects[:, :2] = np.array(pos)
        ee = np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.2)])
        return {
            "ee": ee,
            "rpy": rng.uniform(-0.2, 0.2, size=3),
            "grip": 0.0,
            "holding": -1,
            "objects": objects,
            "colors": [str(c) for c in colors],
            "shapes": shapes,
            "target": target,
            "instruction": f"pick up the {colors[target]} {shapes[target]}",
            "distractors": self._sample_distractors(rng),
        }

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        s["ee"], s["rpy"], s["grip"], force, closed_now = arm_step(s["ee"], s["rpy"], s["grip"], a)
        return force, grasp_and_carry(s, s["ee"], closed_now)

    def _expert(self, s: dict) -> np.ndarray:
        holding_target = s["holding"] == s["target"]
        if s["holding"] >= 0 and not holding_target:
            out = np.zeros(7, dtype=np.float32)
            out[6] = -1.0
            return out
        goal = s["objects"][s["target"], :2]
        return arm_expert(s["ee"], s["rpy"], s["grip"], holding_target, goal, lift=True)

    def _proprio(self, s: dict) -> np.ndarray:
        return np.concatenate([s["ee"], s["rpy"], [s["grip"], float(s["holding"] >= 0)]])

    def _focus_px(self, s: dict) -> tuple[float, float]:
        p = s["ee"] if s["holding"] == s["target"] else s["objects"][s["target"]]
        return to_px(p[0], p[1])

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((150, 120, 90))
        render.box(img, 32, 32, TABLE * SCALE + 1, TABLE * SCALE + 1, 0.0, (185, 160, 125))
        r = OBJ_RADIUS * SCALE
        for i, (p, c, sh) in enumerate(zip(s["objects"], s["colors"], s["shapes"], strict=True)):
            if i == s["holding"]:
                continue
            render.shape(img, sh, *to_px(p[0], p[1]), r, render.PALETTE[c])
        draw_gripper(img, s["ee"], s["grip"], None if s["holding"] < 0 else s, s["holding"])
        return img


def draw_gripper(img, ee, grip, s, holding, color=(20, 20, 20)) -> None:
    """The end effector as a cross whose size grows with height; a held object is drawn under it."""
    cx, cy = to_px(ee[0], ee[1])
    if s is not None and holding >= 0:
        render.shape(img, s["shapes"][holding], cx, cy, OBJ_RADIUS * SCALE, render.PALETTE[s["colors"][holding]])
    size = 2.0 + ee[2] * 20.0
    render.cross(img, cx, cy, size, color, width=0.7 if grip < 0.5 else 1.3)
