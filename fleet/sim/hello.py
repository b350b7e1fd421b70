"""hello: a mobile base (Stretch-like, holonomic here) drives to the named marker around obstacles.

Action: body-frame velocities (vx, vy, yaw rate). The camera is a top-down view of the room.
The expert follows a navigation function (a grid distance field from the target, computed at reset
around inflated obstacles), which has no local minima, so it never gets stuck.
"""

from __future__ import annotations

import numpy as np

import fleet.sim.render as render
from fleet.sim.base import FleetEnv

ROOM = 2.0  # the room spans [-ROOM, ROOM] in x and y (metres)
SCALE = render.SIZE / (2 * ROOM + 0.2)
ROBOT_R = 0.18
MARKER_R = 0.15
REACH = 0.3  # success radius around the target marker centre
CELL = 0.1
N_CELLS = int(2 * ROOM / CELL)
_DIRS = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 24, endpoint=False)])


def to_px(x: float, y: float) -> tuple[float, float]:
    return render.SIZE / 2 + x * SCALE, render.SIZE / 2 - y * SCALE


def _cell_centres() -> np.ndarray:
    c = -ROOM + CELL * (np.arange(N_CELLS) + 0.5)
    return np.stack(np.meshgrid(c, c, indexing="ij"), axis=-1)  # (N, N, 2), [ix, iy]


_CENTRES = _cell_centres()


def distance_field(obstacles: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """Grid path length to `goal` around obstacles inflated by the robot radius ((N, N), inf = blocked)."""
    free = np.ones((N_CELLS, N_CELLS), dtype=bool)
    for ox, oy, r in obstacles:
        free &= np.hypot(_CENTRES[..., 0] - ox, _CENTRES[..., 1] - oy) > r + ROBOT_R + 0.05
    free &= (np.abs(_CENTRES) < ROOM - ROBOT_R).all(axis=-1)
    dist = np.full((N_CELLS, N_CELLS), np.inf)
    g = np.clip(((goal + ROOM) / CELL).astype(int), 0, N_CELLS - 1)
    dist[g[0], g[1]] = 0.0
    free[g[0], g[1]] = True
    steps = [(dx, dy, CELL * np.hypot(dx, dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    for _ in range(4 * N_CELLS):
        prev = dist
        best = dist.copy()
        for dx, dy, cost in steps:
            shifted = np.full_like(dist, np.inf)
            xs = slice(max(dx, 0), N_CELLS + min(dx, 0))
            xd = slice(max(-dx, 0), N_CELLS + min(-dx, 0))
            ys = slice(max(dy, 0), N_CELLS + min(dy, 0))
            yd = slice(max(-dy, 0), N_CELLS + min(-dy, 0))
            shifted[xd, yd] = dist[xs, ys] + cost
            best = np.minimum(best, shifted)
        dist = np.where(free, best, np.inf)
        if np.array_equal(dist, prev):
            break
    return dist


def _lookup(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Field values at (K, 2) world points (nearest cell)."""
    i = np.clip(((points + ROOM) / CELL).astype(int), 0, N_CELLS - 1)
    return field[i[:, 0], i[:, 1]]


class HelloEnv(FleetEnv):
    embodiment = "hello"
    actuator_bias = (-0.3, 0.3, 0.8)

    def _sample_state(self, rng: np.random.Generator) -> dict:
        colors = [str(c) for c in rng.permutation(render.TRAIN_COLORS)[:3]]
        target = int(rng.integers(3))
        if "novel_object" in self.shifts:
            colors[target] = str(rng.choice(render.NOVEL_COLORS))
        obstacles = []
        while len(obstacles) < 3:
            o = (rng.uniform(-1.1, 1.1), rng.uniform(-1.1, 1.1), rng.uniform(0.2, 0.35))
            if all(np.hypot(o[0] - q[0], o[1] - q[1]) > o[2] + q[2] + 0.5 for q in obstacles):
                obstacles.append(o)
        obstacles = np.array(obstacles)

        def clear(p: np.ndarray, margin: float) -> bool:
            return all(np.hypot(*(p - o[:2])) > o[2] + margin for o in obstacles)

        markers: list[np.ndarray] = []
        while len(markers) < 3:
            p = rng.uniform(-ROOM + 0.3, ROOM - 0.3, size=2)
            if clear(p, ROBOT_R + 0.25) and all(np.hypot(*(p - m)) > 1.0 for m in markers):
                markers.append(p)
        while True:
            pos = rng.uniform(-ROOM + 0.3, ROOM - 0.3, size=2)
            if clear(pos, ROBOT_R + 0.1) and np.hypot(*(pos - markers[target])) > 1.2:
                break
        goal = markers[target]
        return {
            "pos": pos,
            "yaw": float(rng.uniform(-np.pi, np.pi)),
            "yaw_rate": 0.0,
            "obstacles": obstacles,
            "markers": np.array(markers),
            "colors": colors,
            "target": target,
            "field": distance_field(obstacles, goal),
            "instruction": f"drive to the {colors[target]} marker",
            "distractors": self._sample_distractors(rng),
        }

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        c, sn = np.cos(s["yaw"]), np.sin(s["yaw"])
        world_v = np.array([c * a[0] - sn * a[1], sn * a[0] + c * a[1]])
        pos = s["pos"] + world_v * self.embodiment_spec.dt
        force = 0.0
        for ox, oy, r in s["obstacles"]:
            d = pos - (ox, oy)
            n = float(np.hypot(*d))
            if n < r + ROBOT_R:
                # bumper contact: pushed back to the surface, force grows with the commanded penetration
                force = max(force, 400.0 * (r + ROBOT_R - n))
                pos = np.array([ox, oy]) + d / max(n, 1e-6) * (r + ROBOT_R)
        lim = ROOM - ROBOT_R
        if np.abs(pos).max() > lim:
            force = max(force, 400.0 * float(np.abs(pos).max() - lim))
            pos = np.clip(pos, -lim, lim)
        s["pos"] = pos
        s["yaw"] = float((s["yaw"] + a[2] * self.embodiment_spec.dt + np.pi) % (2 * np.pi) - np.pi)
        s["yaw_rate"] = float(a[2])
        success = np.hypot(*(pos - s["markers"][s["target"]])) < REACH
        return force, bool(success)

    def _expert(self, s: dict) -> np.ndarray:
        pos, goal = s["pos"], s["markers"][s["target"]]
        to_goal = goal - pos
        dist = float(np.hypot(*to_goal))
        step = 0.25
        cands = pos + step * _DIRS
        vals = _lookup(s["field"], cands)
        if dist < 0.45 or not np.isfinite(vals).any():
            direction = to_goal / max(dist, 1e-6)
        else:
            direction = _DIRS[int(np.argmin(vals))]
        speed = min(0.55, 1.0 * dist)
        v = direction * speed
        c, sn = np.cos(s["yaw"]), np.sin(s["yaw"])
        body = np.array([c * v[0] + sn * v[1], -sn * v[0] + c * v[1]])
        heading = float(np.arctan2(to_goal[1], to_goal[0]))
        yaw_err = (heading - s["yaw"] + np.pi) % (2 * np.pi) - np.pi
        return np.array([body[0], body[1], np.clip(1.5 * yaw_err, -1.5, 1.5)], dtype=np.float32)

    def _proprio(self, s: dict) -> np.ndarray:
        return np.array(
            [s["pos"][0] / ROOM, s["pos"][1] / ROOM, np.sin(s["yaw"]), np.cos(s["yaw"]), s["yaw_rate"] / 1.5]
        )

    def _focus_px(self, s: dict) -> tuple[float, float]:
        m = s["markers"][s["target"]]
        return to_px(m[0], m[1])

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((60, 50, 45))
        render.box(img, 32, 32, ROOM * SCALE, ROOM * SCALE, 0.0, (205, 200, 190))
        for ox, oy, r in s["obstacles"]:
            render.disk(img, *to_px(ox, oy), r * SCALE, (95, 95, 100))
        for m, col in zip(s["markers"], s["colors"], strict=True):
            render.disk(img, *to_px(m[0], m[1]), MARKER_R * SCALE + 0.8, render.PALETTE[col])
        cx, cy = to_px(*s["pos"])
        render.disk(img, cx, cy, ROBOT_R * SCALE, (25, 25, 25))
        hx, hy = cx + np.cos(s["yaw"]) * ROBOT_R * SCALE, cy - np.sin(s["yaw"]) * ROBOT_R * SCALE
        render.disk(img, hx, hy, 1.2, (250, 250, 250))
        return img
