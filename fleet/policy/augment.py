"""Training-time augmentation: the everyday shifts of a real site, at random strengths, on every batch.

A camera that is dimmer or warmer than the teleoperation rig, a camera knocked by a few pixels and
clutter on the table collapse a policy that only saw the clean rig (the shipped checkpoint: franka
98% -> 37% under the sims' `lighting` shift, 24% under `camera_offset`). Visual policies are trained
with random shifts and colour jitter for this (DrQ, Diffusion Policy, ACT, Octo). This module applies
the simulators' own shift machinery (fleet.sim.render: `cross`/`disk`/`box` clutter, `apply_lighting`,
`apply_offset` with the black fill of a shifted camera) to training images, in the sims' order
(clutter, then lighting, then the camera offset), and moves the privileged focus target with the
image, exactly as `FleetEnv.focus` does under `camera_offset`.

Held out: the randomisation ranges stop short of the named evaluation shifts, so `fleet eval --shift`
measures the policy at and beyond the edge of what training saw (see `held_out_report`):
- lighting: overall gain in [0.65, 1.3] times a per-channel gain in [0.92, 1.08] (so no channel below
  0.598), tint per channel in [-28, 28]. The `lighting` shift is gain 0.55, tint (+40, +25, -10): its
  gain and its red cast lie beyond the training range, its green and blue casts inside it.
- camera offset: whole pixels, dx and dy each in [-3, 3]. The `camera_offset` shift is (4, -3): dx
  beyond the range, dy at its edge.
- clutter: 1-3 crosses, disks or squares of radius 1.5-3.5 px, in colours at least 60 (RGB distance)
  away from every colour the `distractors` shift draws and from every object colour an instruction
  can name; the `distractors` shift's colours are never drawn in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

import fleet.sim.render as render
from fleet.policy.batch import PolicyBatch
from fleet.sim.base import FleetEnv

# the colours the `distractors` shift draws (FleetEnv._sample_distractors); training clutter keeps away
DISTRACTOR_COLORS: tuple[tuple[int, int, int], ...] = ((90, 60, 30), (200, 200, 200), (20, 90, 90), (120, 120, 30))
CLUTTER_MIN_COLOR_DISTANCE = 60.0
_AVOID = np.array(list(DISTRACTOR_COLORS) + list(render.PALETTE.values()), np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training-time shifts (each row draws its own, independently)."""

    p_lighting: float = 0.4
    # share of rows whose brightness and colour cast are jittered
    gain: tuple[float, float] = (0.65, 1.3)
    # overall gain range (the `lighting` shift's 0.55 lies below it)
    channel_gain: tuple[float, float] = (0.92, 1.08)
    # extra per-channel gain (white balance)
    tint: float = 28.0
    # additive cast per channel in [-tint, tint] (the `lighting` shift adds +40 red, +25 green)
    p_offset: float = 0.4
    # share of rows shifted by whole pixels, as a knocked camera
    max_offset: int = 3
    # |dx|, |dy| <= max_offset (the `camera_offset` shift is (4, -3))
    p_clutter: float = 0.25
    # share of rows with clutter drawn on the table
    clutter: tuple[int, int] = (1, 3)
    # how many clutter shapes (inclusive)
    clutter_radius: tuple[float, float] = (1.5, 3.5)

    def __post_init__(self) -> None:
        for f in ("p_lighting", "p_offset", "p_clutter"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ValueError(f"AugmentConfig.{f} must be a probability in [0, 1], got {v!r}")
        for f in ("gain", "channel_gain", "clutter_radius"):
            lo, hi = getattr(self, f)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
                raise ValueError(f"AugmentConfig.{f} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        if not (math.isfinite(self.tint) and 0 <= self.tint <= 255):
            raise ValueError(f"AugmentConfig.tint must be in [0, 255], got {self.tint!r}")
        if not (isinstance(self.max_offset, int) and 0 <= self.max_offset < render.SIZE // 2):
            raise ValueError(f"AugmentConfig.max_offset must be a whole number in [0, 31], got {self.max_offset!r}")
        lo, hi = self.clutter
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= 16):
            raise ValueError(
                f"AugmentConfig.clutter must be (low, high) whole numbers, 0 <= low <= high <= 16, got {(lo, hi)}"
            )


def parse_augment_shares(text: str) -> dict[str, float]:
    """The CLI's `--augment-p 'lighting=0,offset=0.35'` -> {"p_lighting": 0.0, "p_offset": 0.35}, keyword
    arguments for AugmentConfig (which checks each is a probability)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in ("lighting", "offset", "clutter") or not sep:
            raise ValueError(f"--augment-p: expected lighting|offset|clutter=SHARE pairs, got {part!r}")
        try:
            out[f"p_{name}"] = float(value)
        except ValueError:
            raise ValueError(f"--augment-p: {name} share must be a number in [0, 1], got {value.strip()!r}") from None
    return out


@dataclass(frozen=True)
class RowShift:
    """What one row got (None: not applied); `augment_batch` returns these so tests can replay them."""

    clutter: tuple | None = None  # ((kind, x, y, r, (r, g, b)), ...)
    gain: tuple[float, float, float] | None = None  # per-channel gain (overall x channel)
    tint: tuple[float, float, float] | None = None
    offset: tuple[int, int] | None = None  # (dx, dy) whole pixels


def sample_clutter_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour at least CLUTTER_MIN_COLOR_DISTANCE from the eval distractors and the object palette."""
    while True:
        c = rng.integers(0, 256, size=3)
        if np.sqrt(((_AVOID - c) ** 2).sum(1)).min() >= CLUTTER_MIN_COLOR_DISTANCE:
            return int(c[0]), int(c[1]), int(c[2])


def sample_shift(rng: np.random.Generator, cfg: AugmentConfig) -> RowShift:
    """Draw one row's shifts."""
    clutter = gain = tint = offset = None
    if rng.random() < cfg.p_clutter:
        n = int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1))
        clutter = tuple(
            (
                str(rng.choice(("cross", "disk", "box"))),
                float(rng.uniform(4, render.SIZE - 4)),
                float(rng.uniform(4, render.SIZE - 4)),
                float(rng.uniform(*cfg.clutter_radius)),
                sample_clutter_color(rng),
            )
            for _ in range(n)
        )
    if rng.random() < cfg.p_lighting:
        g = rng.uniform(*cfg.gain)
        gain = tuple(float(g * rng.uniform(*cfg.channel_gain)) for _ in range(3))
        tint = tuple(float(rng.uniform(-cfg.tint, cfg.tint)) for _ in range(3))
    if rng.random() < cfg.p_offset and cfg.max_offset > 0:
        while offset is None or offset == (0, 0):
            offset = (
                int(rng.integers(-cfg.max_offset, cfg.max_offset + 1)),
                int(rng.integers(-cfg.max_offset, cfg.max_offset + 1)),
            )
    return RowShift(clutter, gain, tint, offset)


def apply_shift(image: np.ndarray, focus: np.ndarray | None, s: RowShift) -> tuple[np.ndarray, np.ndarray | None]:
    """One (64, 64, 3) uint8 image (and its (2,) focus in [-1, 1] coordinates) under `s`, via the sims' renderer."""
    img = image
    if s.clutter:
        img = img.copy()
        for kind, x, y, r, col in s.clutter:
            if kind == "cross":
                render.cross(img, x, y, r, col, width=1.0)
            elif kind == "disk":
                render.disk(img, x, y, r, col)
            else:
                render.box(img, x, y, r * 0.8, r * 0.8, 0.0, col)
    if s.gain is not None:
        img = render.apply_lighting(img, np.asarray(s.gain, np.float32), s.tint)
    if s.offset is not None:
        img = render.apply_offset(img, *s.offset)
        if focus is not None:
            focus = focus + np.asarray(s.offset, np.float32) * np.float32(2.0 / render.SIZE)
    return img, focus


def augment_batch(batch: PolicyBatch, gen: torch.Generator, cfg: AugmentConfig) -> tuple[PolicyBatch, list[RowShift]]:
    """A copy of `batch` with each row's image (and focus target) under its own random shifts.

    Draws from a numpy generator seeded off `gen`, so a training run stays reproducible from its seed.
    Actions, proprio and instructions are unchanged: the world is the same, only the camera sees it differently."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    images = batch.image.numpy().copy()
    focus = None if batch.focus is None else batch.focus.numpy().copy()
    shifts = []
    for i in range(len(images)):
        s = sample_shift(rng, cfg)
        shifts.append(s)
        if s.clutter or s.gain is not None or s.offset is not None:
            img, f = apply_shift(images[i], None if focus is None else focus[i], s)
            images[i] = img
            if focus is not None:
                focus[i] = f
    out = PolicyBatch(
        torch.from_numpy(images),
        batch.proprio,
        batch.instr_ids,
        batch.emb_idx,
        batch.embodiments,
        batch.actions,
        focus=None if focus is None else torch.from_numpy(focus),
    )
    return out, shifts


def held_out_report(cfg: AugmentConfig) -> dict[str, dict]:
    """Where each named evaluation shift lies relative to the training ranges (for the report and the tests)."""
    gain, tint = FleetEnv.lighting
    dx, dy = FleetEnv.camera_shift
    min_gain = cfg.gain[0] * cfg.channel_gain[0]
    return {
        "lighting": {
            "eval_gain": gain,
            "train_gain_range": [min_gain, cfg.gain[1] * cfg.channel_gain[1]],
            "gain_beyond": gain < min_gain,
            "eval_tint": list(tint),
            "train_tint_range": [-cfg.tint, cfg.tint],
            "tint_beyond_channels": [c for c, t in zip("rgb", tint, strict=True) if abs(t) > cfg.tint],
        },
        "camera_offset": {
            "eval_offset": [dx, dy],
            "train_range": [-cfg.max_offset, cfg.max_offset],
            "beyond_axes": [a for a, v in zip("xy", (dx, dy), strict=True) if abs(v) > cfg.max_offset],
        },
        "distractors": {
            "eval_colors": [list(c) for c in DISTRACTOR_COLORS],
            "train_min_color_distance": CLUTTER_MIN_COLOR_DISTANCE,
        },
    }
