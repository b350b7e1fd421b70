"""so100: a low-cost 6-dim arm (SO-100-like) picks up the named object on franka's table.

The scene and the instructions are franka's ("pick up the {color} {shape}", the same table, objects and
camera), so what the shared backbone learned about objects and words carries over; the body is not:
five revolute joints (pan, shoulder lift, elbow, wrist pitch, wrist roll) and a gripper, mounted at the
table's near edge, commanded in joint-angle deltas per tick. The policy sees joint angles, not an
end-effector pose, so it must learn this arm's kinematics from demonstrations. Pretraining never saw it
(its spec is in `fleet.embodiments.CATALOG`, not in `EMBODIMENTS`).

Grasping needs the jaw aligned with the table's axes: |wrist roll - pan| < ROLL_TOLERANCE, so the roll
joint matters. Success is holding the named object above `LIFT_HEIGHT`.
"""

from __future__ import annotations

import numpy as np

import fleet.sim.render as render
from fleet.sim.base import FleetEnv
from fleet.sim.franka import (
    CLOSE_RADIUS,
    DESCEND_RADIUS,
    HOVER,
    LIFT_HEIGHT,
    OBJ_RADIUS,
    SCALE,
    TABLE,
    FrankaEnv,
    grasp_and_carry,
    to_px,
)

BASE = np.array([0.0, -0.33])  # the arm's base, just off the table's near edge (metres)
BASE_HEIGHT = 0.05
L1, L2, L3 = 0.32, 0.32, 0.06  # upper arm, forearm, wrist-to-fingertip
JOINT_LOW = np.array([-1.3, -0.3, -2.95, -2.6, -1.6])
JOINT_HIGH = np.array([1.3, 2.1, 0.3, 1.2, 1.6])
ROLL_TOLERANCE = 0.35
MAX_STEP = 0.1  # the largest joint delta one tick commands (the action bound)
CART_STEP = 0.04  # the expert's fingertip moves at most this far per tick (metres)
TABLE_FLOOR = -0.01  # the workspace guard's floor for the fingertip: 1 cm into the table is 8 N (e-stop at 25 N)
GUARD_ITERATIONS = 12  # bisection steps of the guard: the step's share is found to 1/4096


def forward(q: np.ndarray) -> np.ndarray:
    """Fingertip position (x, y, z) of joint angles q (5,): pan turns about the base's vertical axis (0 = +y)."""
    a1, a2, a3 = q[1], q[1] + q[2], q[1] + q[2] + q[3]
    r = L1 * np.cos(a1) + L2 * np.cos(a2) + L3 * np.cos(a3)
    z = BASE_HEIGHT + L1 * np.sin(a1) + L2 * np.sin(a2) + L3 * np.sin(a3)
    return np.array([BASE[0] + r * np.sin(q[0]), BASE[1] + r * np.cos(q[0]), z])


def workspace_guard(action: np.ndarray, proprio: np.ndarray) -> np.ndarray:
    """so100's task-space wall (fleet.control.SafetyConfig.workspace_guard): the arm's joint step shrunk, along its
    own direction, until the fingertip it leads to is no lower than TABLE_FLOOR; a fingertip already below may
    only rise. The per-joint walls of EmbodimentSpec.position_limits cannot say "above the table" for a joint arm.
    """
    out = np.asarray(action, np.float64).copy()
    q = np.asarray(proprio[:5], np.float64)
    dq = out[:5].copy()
    z0 = forward(q)[2]
    if forward(np.clip(q + dq, JOINT_LOW, JOINT_HIGH))[2] >= min(TABLE_FLOOR, z0) or not dq.any():
        return out
    lo, hi = 0.0, 1.0  # the step at lo ends above the floor (or, from below it, no lower), the one at hi does not
    for _ in range(GUARD_ITERATIONS):
        mid = 0.5 * (lo + hi)
        if forward(np.clip(q + mid * dq, JOINT_LOW, JOINT_HIGH))[2] >= min(TABLE_FLOOR, z0):
            lo = mid
        else:
            hi = mid
    out[:5] = lo * dq
    return out


def inverse(target: np.ndarray, roll: float) -> np.ndarray:
    """Joint angles (5,) that put the fingertip at `target` (x, y, z) pointing straight down (elbow up)."""
    d = np.asarray(target[:2], float) - BASE
    pan = float(np.arctan2(d[0], d[1]))
    rw = float(np.hypot(*d))
    zw = float(target[2]) + L3 - BASE_HEIGHT  # the wrist sits L3 above a downward-pointing fingertip
    cos_elbow = np.clip((rw * rw + zw * zw - L1 * L1 - L2 * L2) / (2 * L1 * L2), -1.0, 1.0)
    elbow = -float(np.arccos(cos_elbow))
    lift = float(np.arctan2(zw, rw) - np.arctan2(L2 * np.sin(elbow), L1 + L2 * np.cos(elbow)))
    pitch = -np.pi / 2 - lift - elbow
    return np.clip(np.array([pan, lift, elbow, pitch, roll]), JOINT_LOW, JOINT_HIGH)


def _link_points(q: np.ndarray) -> list[np.ndarray]:
    """(x, y) of base, elbow, wrist, fingertip: what the top-down camera sees of the arm."""
    u = np.array([np.sin(q[0]), np.cos(q[0])])
    a1, a2 = q[1], q[1] + q[2]
    r1 = L1 * np.cos(a1)
    r2 = r1 + L2 * np.cos(a2)
    return [BASE, BASE + r1 * u, BASE + r2 * u, forward(q)[:2]]


class So100Env(FleetEnv):
    embodiment = "so100"
    workspace_guard = staticmethod(workspace_guard)  # the robot-side safety layer's task-space wall (SimRobot)
    actuator_bias = (0.03, -0.02, 0.0, 0.0, 0.0, 0.0)

    def _sample_state(self, rng: np.random.Generator) -> dict:
        # franka's scene sampler: same objects, colours, shapes, instruction and distractors
        s = FrankaEnv._sample_state(self, rng)
        start = np.array([rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.12), rng.uniform(0.1, 0.2)])
        q = inverse(start, float(rng.uniform(-0.6, 0.6))) + rng.uniform(-0.1, 0.1, size=5)
        s["q"] = np.clip(q, JOINT_LOW, JOINT_HIGH)
        del s["ee"], s["rpy"]
        return s

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        q = np.clip(s["q"] + a[:5], JOINT_LOW, JOINT_HIGH)
        tip = forward(q)
        force = 0.0
        if tip[2] < 0.0:
            # the fingertip meets the table: the joints stall there, the contact force grows with the push
            force = 800.0 * -tip[2]
            q = s["q"]
            tip = forward(q)
        s["q"] = q
        grip = s["grip"]
        target = (float(a[5]) + 1.0) / 2.0
        s["grip"] = grip + float(np.clip(target - grip, -0.34, 0.34))
        closed_now = grip <= 0.8 < s["grip"]
        aligned = abs(q[4] - q[0]) < ROLL_TOLERANCE
        return force, grasp_and_carry(s, tip, closed_now and aligned)

    def _expert(self, s: dict) -> np.ndarray:
        """Scripted arm in task space (hover, descend, close, lift), turned into joint deltas by inverse kinematics."""
        q, grip = s["q"], s["grip"]
        tip = forward(q)
        out = np.zeros(6, dtype=np.float32)
        roll = float(np.clip(q[0], JOINT_LOW[4], JOINT_HIGH[4]))  # jaw aligned with the table's axes
        holding_target = s["holding"] == s["target"]
        if s["holding"] >= 0 and not holding_target:
            out[5] = -1.0  # holding the wrong object: let go
            return out
        goal = s["objects"][s["target"], :2]
        dist = float(np.hypot(*(goal - tip[:2])))
        out[5] = -1.0
        if holding_target:
            want = np.array([tip[0], tip[1], LIFT_HEIGHT + 0.05])
            out[5] = 1.0
        elif dist < CLOSE_RADIUS and tip[2] <= 0.02 and abs(q[4] - q[0]) < ROLL_TOLERANCE:
            want = tip
            out[5] = 1.0
        elif grip > 0.3:
            want = np.array([tip[0], tip[1], tip[2] + 0.03])  # closed on nothing: open and back off upwards
        elif dist > DESCEND_RADIUS or abs(q[4] - q[0]) >= ROLL_TOLERANCE:
            want = np.array([goal[0], goal[1], HOVER])
        else:
            want = np.array([goal[0], goal[1], 0.01])
        # move the fingertip along a straight line, a few centimetres per tick: interpolating in joint space
        # instead would swing it through the table on the way
        step = want - tip
        norm = float(np.linalg.norm(step))
        if norm > CART_STEP:
            step *= CART_STEP / norm
        dq = inverse(tip + step, roll) - q
        out[:5] = np.clip(0.8 * dq, -MAX_STEP, MAX_STEP)
        return out

    def _proprio(self, s: dict) -> np.ndarray:
        return np.concatenate([s["q"], [s["grip"], float(s["holding"] >= 0)]])

    def _focus_px(self, s: dict) -> tuple[float, float]:
        p = forward(s["q"]) if s["holding"] == s["target"] else s["objects"][s["target"]]
        return to_px(p[0], p[1])

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((150, 120, 90))
        render.box(img, 32, 32, TABLE * SCALE + 1, TABLE * SCALE + 1, 0.0, (185, 160, 125))
        r = OBJ_RADIUS * SCALE
        for i, (p, c, sh) in enumerate(zip(s["objects"], s["colors"], s["shapes"], strict=True)):
            if i != s["holding"]:
                render.shape(img, sh, *to_px(p[0], p[1]), r, render.PALETTE[c])
        pts = [to_px(p[0], p[1]) for p in _link_points(s["q"])]
        for (x0, y0), (x1, y1), width in zip(pts[:-1], pts[1:], (1.6, 1.3, 0.9), strict=True):
            length = float(np.hypot(x1 - x0, y1 - y0))
            angle = float(np.arctan2(y1 - y0, x1 - x0))
            render.box(img, (x0 + x1) / 2, (y0 + y1) / 2, length / 2 + 0.5, width, angle, (235, 235, 235))
        render.disk(img, *pts[0], 3.0, (60, 60, 70))
        cx, cy = pts[-1]
        if s["holding"] >= 0:
            h = s["holding"]
            render.shape(img, s["shapes"][h], cx, cy, r, render.PALETTE[s["colors"][h]])
        # the jaw, drawn along the wrist roll (image y points down) and larger the higher it is: the camera
        # shows whether it is aligned with the table and how far above it
        size = 2.0 + forward(s["q"])[2] * 20.0
        render.box(img, cx, cy, size, 0.7 if s["grip"] < 0.5 else 1.3, -float(s["q"][4]), (20, 20, 20))
        return img
