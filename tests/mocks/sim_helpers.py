"""Helpers for the simulator tests: deep comparison, env snapshots, expert roll-outs and a fifth robot.

`PointerEnv` / `POINTER_SPEC` are a deliberately tiny user-defined embodiment (a 2-D point that drives to
a coloured marker) used to test `register_embodiment` and `register_env` without touching the four
built-in bodies. Register them only through a fixture that removes them again.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet.embodiments import EmbodimentSpec
from fleet.sim import render
from fleet.sim.base import FleetEnv

NAMES: tuple[str, ...] = ("franka", "aloha", "hello", "leap")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- deep comparison ---------------------------------------------------------------------------------
def assert_tree_equal(a: Any, b: Any, path: str = "root") -> None:
    """Exact, recursive equality of nested dicts / lists / tuples / numpy arrays / scalars, with a path."""
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        assert x.shape == y.shape, f"{path}: shape {x.shape} != {y.shape}"
        assert x.dtype == y.dtype, f"{path}: dtype {x.dtype} != {y.dtype}"
        np.testing.assert_array_equal(x, y, err_msg=path)
    elif isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@dataclass
class Snapshot:
    state: dict
    t: int
    rng: dict
    image: np.ndarray | None


def snapshot(env) -> Snapshot:
    """Everything that defines a FleetEnv's future: task state, time, RNG state, last frame."""
    u = env.unwrapped
    return Snapshot(
        state=copy.deepcopy(u._state),
        t=u._t,
        rng=copy.deepcopy(u.np_random.bit_generator.state),
        image=None if u._last_image is None else u._last_image.copy(),
    )


def assert_unchanged(env, snap: Snapshot) -> None:
    u = env.unwrapped
    assert_tree_equal(u._state, snap.state, "env._state")
    assert u._t == snap.t, f"env.t changed: {snap.t} -> {u._t}"
    assert_tree_equal(u.np_random.bit_generator.state, snap.rng, "env.np_random state")
    assert_tree_equal(u._last_image, snap.image, "env._last_image")


def assert_obs_equal(a: dict, b: dict, where: str = "obs") -> None:
    assert_tree_equal(a, b, where)


# ---- roll-outs -------------------------------------------------------------------------------------
def expert_episode(env, seed: int) -> tuple[bool, int]:
    """Run the privileged expert for one episode; return (success, steps)."""
    env.reset(seed=seed)
    u = env.unwrapped
    steps, done, info = 0, False, {}
    while not done:
        _, _, term, trunc, info = env.step(u.expert_action())
        steps += 1
        done = term or trunc
    return bool(info["is_success"]), steps


def expert_success(env, seeds) -> tuple[int, int, list[int]]:
    """(successes, episodes, failing seeds) of the expert over `seeds`."""
    seeds = list(seeds)
    failed = [s for s in seeds if not expert_episode(env, s)[0]]
    return len(seeds) - len(failed), len(seeds), failed


def mid_action(env) -> np.ndarray:
    u = env.unwrapped
    return ((u._low + u._high) / 2).astype(np.float32)


# ---- PNG ---------------------------------------------------------------------------------------------
def png_info(data: bytes) -> tuple[int, int]:
    """Validate a PNG byte string (signature, chunk CRCs, IHDR first, IEND last); return (width, height)."""
    import struct
    import zlib

    assert data[:8] == PNG_SIGNATURE, f"not a PNG: starts with {data[:8]!r}"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        assert pos + 8 <= len(data), "truncated chunk header"
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", f"chunk order {chunks[:3]}...{chunks[-2:]}"
    assert idat, "no image data"
    zlib.decompress(idat)  # the pixel stream inflates
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---- a fifth, user-defined robot -----------------------------------------------------------------------
POINTER_SPEC = EmbodimentSpec(
    name="pointer",
    action_dim=2,
    head="token",
    proprio_dim=4,
    action_low=(-0.1, -0.1),
    action_high=(0.1, 0.1),
    max_velocity=(1.0, 1.0),
    max_force=10.0,
    control_hz=10.0,
    max_episode_steps=40,
    dim_names=("vx", "vy"),
    description="test robot: a point that drives to the named marker",
)


class PointerEnv(FleetEnv):
    """A point on a 1 x 1 plane drives to the named marker. Exists only for registry tests."""

    embodiment = "pointer"
    actuator_bias = (0.03, -0.03)

    def _sample_state(self, rng: np.random.Generator) -> dict:
        pool = render.NOVEL_COLORS if "novel_object" in self.shifts else render.TRAIN_COLORS
        color = str(rng.choice(pool))
        return {
            "pos": rng.uniform(-0.5, 0.5, size=2),
            "goal": rng.uniform(-0.5, 0.5, size=2),
            "color": color,
            "instruction": f"drive to the {color} marker",
            "distractors": self._sample_distractors(rng),
        }

    def _advance(self, s: dict, a: np.ndarray) -> tuple[float, bool]:
        s["pos"] = np.clip(s["pos"] + a, -0.5, 0.5)
        return 0.0, bool(np.hypot(*(s["pos"] - s["goal"])) < 0.05)

    def _expert(self, s: dict) -> np.ndarray:
        return np.clip(s["goal"] - s["pos"], -0.1, 0.1).astype(np.float32)

    def _proprio(self, s: dict) -> np.ndarray:
        return np.concatenate([s["pos"], s["goal"]])

    def _render(self, s: dict) -> np.ndarray:
        img = render.blank((30, 30, 30))
        gx, gy = 32 + 56 * s["goal"][0], 32 - 56 * s["goal"][1]
        render.disk(img, gx, gy, 3.0, render.PALETTE[s["color"]])
        render.disk(img, 32 + 56 * s["pos"][0], 32 - 56 * s["pos"][1], 2.0, (240, 240, 240))
        return img
