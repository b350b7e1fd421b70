"""Per-robot image adapters: a robot's camera frames mapped back onto the rig the policy was trained on.

A dimmer, warmer light or a camera knocked by a few pixels changes every frame a robot sends, and a
head-only round cannot undo it: the frozen vision encoder sees a view it never saw (issue 19). An
`ImageAdapter` is eight numbers owned by one robot: a whole-pixel offset (dx, dy) and a colour gain and bias
per channel. The policy server applies it to that robot's frames before anything else reads them, so every
backend serves it, while the shared weights and every other robot's frames stay bit-identical.

    adapter = fit_image_adapter(frames, stats)   # frames: the robot's recent camera images (its corrections')
    adapter.adapter.apply(image)                  # (H, W, 3) uint8 -> (H, W, 3) uint8, what the policy reads

`fit_image_adapter` registers the frames to the statistics of the clean rig (`fleet.control.image_ood`,
shipped in the checkpoint as `extra.image_stats`): for every offset within `radius` pixels it shifts the
frames (uncovered pixels take the rig's border colour), matches each channel's mean and spread to the clean
frames', and keeps the offset whose result is closest to the clean statistics (the mean image distance; the identity
when nothing beats the frames as they are), then refines the gain's overall scale there. Nothing but
the robot's own frames is needed, so it works from the first few corrections; whether the adapter may be
served is a separate question that `fleet.learning.vision_round` answers on the corrections themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SHIFT = 16  # pixels: a larger offset is not a bumped camera but another camera
GAIN_RANGE = (0.2, 5.0)
SEARCH_RADIUS = 6  # offsets tried by fit_image_adapter, each way
FIT_FRAMES = 32  # frames fit_image_adapter reads at most (evenly spread over those given)
NEAR = 1  # offsets within this many pixels of the statistics' choice are candidates for the corrections' loss
GAIN_SCALES = tuple(float(s) for s in np.linspace(0.85, 1.2, 15))  # the gain's overall scale, refined last


@dataclass(frozen=True)
class ImageAdapter:
    """out(y, x) = clip(gain * in(y + dy, x + dx) + bias) per channel, in [0, 1] image units. Pixels the offset
    uncovers get `fill` (the clean rig's border colour, [0, 1] units, not colour-corrected) or, with None, repeat
    the edge."""

    dx: int = 0
    dy: int = 0
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fill: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        for field in ("dx", "dy"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or abs(int(v)) > MAX_SHIFT:
                raise ValueError(f"ImageAdapter.{field}: expected an int in [-{MAX_SHIFT}, {MAX_SHIFT}], got {v!r}")
            object.__setattr__(self, field, int(v))
        lo, hi = GAIN_RANGE
        for field, ok, want in (
            ("gain", lambda g: lo <= g <= hi, f"in [{lo}, {hi}]"),
            ("bias", lambda b: -1.0 <= b <= 1.0, "in [-1, 1]"),
            ("fill", lambda f: 0.0 <= f <= 1.0, "in [0, 1] (or null)"),
        ):
            raw = getattr(self, field)
            if field == "fill" and raw is None:
                continue
            try:
                vals = tuple(float(x) for x in raw)
            except (TypeError, ValueError):
                vals = ()
            if len(vals) != 3 or not all(math.isfinite(x) and ok(x) for x in vals):
                raise ValueError(f"ImageAdapter.{field}: expected 3 finite numbers {want}, got {raw!r}")
            object.__setattr__(self, field, vals)

    @property
    def is_identity(self) -> bool:
        return self.dx == 0 and self.dy == 0 and self.gain == (1.0, 1.0, 1.0) and self.bias == (0.0, 0.0, 0.0)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) or (N, H, W, 3) uint8 -> the same shape, uint8."""
        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
            raise ValueError(f"image: expected (H, W, 3) or (N, H, W, 3) uint8, got {img.shape} {img.dtype}")
        if self.is_identity:
            return img
        x = shift_frames(img, self.dx, self.dy).astype(np.float32)
        x = x * np.asarray(self.gain, np.float32) + np.asarray(self.bias, np.float32) * 255.0
        if self.fill is not None and (self.dx or self.dy):
            fill = np.asarray(self.fill, np.float32) * 255.0
            h, w = x.shape[-3], x.shape[-2]
            if self.dx:  # columns whose source lies outside the frame
                x[..., :, slice(w - self.dx, w) if self.dx > 0 else slice(0, -self.dx), :] = fill
            if self.dy:
                x[..., slice(h - self.dy, h) if self.dy > 0 else slice(0, -self.dy), :, :] = fill
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def to_dict(self) -> dict:
        d = {"dx": self.dx, "dy": self.dy, "gain": list(self.gain), "bias": list(self.bias)}
        return d if self.fill is None else d | {"fill": list(self.fill)}

    @classmethod
    def from_dict(cls, d: object) -> ImageAdapter:
        if not isinstance(d, dict):
            raise ValueError(f"image adapter: expected a dict with dx, dy, gain, bias, got {type(d).__name__}")
        unknown = set(d) - {"dx", "dy", "gain", "bias", "fill"}
        if unknown:
            raise ValueError(f"image adapter: unknown keys {sorted(unknown)}; expected dx, dy, gain, bias, fill")
        return cls(**d)


def shift_frames(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """out(y, x) = in(y + dy, x + dx) over the last-but-one two axes (H, W); uncovered pixels repeat the edge."""
    if dx == 0 and dy == 0:
        return images
    h, w = images.shape[-3], images.shape[-2]
    ys = np.clip(np.arange(h) + dy, 0, h - 1)
    xs = np.clip(np.arange(w) + dx, 0, w - 1)
    return np.take(np.take(images, ys, axis=-3), xs, axis=-2)


def _channel_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over frames of each frame's per-channel mean and spread, x (N, H, W, 3) in [0, 1]."""
    flat = x.reshape(x.shape[0], -1, 3)
    return flat.mean(1).mean(0), flat.std(1).mean(0)


@dataclass(frozen=True)
class AdapterFit:
    adapter: ImageAdapter
    distance_before: float  # mean image distance of the frames as they came (about 1 on the clean rig)
    distance_after: float  # ... after the adapter
    frames: int
    # (distance, adapter): offsets within NEAR pixels of the chosen one, each with its colours and with the
    # colours left alone; what the corrections' loss chooses among (fleet.learning.vision_round)
    candidates: tuple = ()


def _with_gain(dx: int, dy: int, gain: np.ndarray, mean: np.ndarray, clean_mean: np.ndarray, fill) -> ImageAdapter:
    """The adapter with this offset and gain whose bias puts each channel's mean at the clean rig's."""
    bias = np.clip(clean_mean - gain * mean, -1.0, 1.0)
    return ImageAdapter(dx, dy, tuple(float(g) for g in gain), tuple(float(b) for b in bias), fill)


def _placed(imgs: np.ndarray, dx: int, dy: int, fill) -> np.ndarray:
    """Frames (N, H, W, 3) uint8 shifted as an adapter shifts them, uncovered pixels `fill`, in [0, 1] float32."""
    return ImageAdapter(dx, dy, fill=fill).apply(imgs).astype(np.float32) / 255.0


def fit_image_adapter(images: np.ndarray, stats, radius: int = SEARCH_RADIUS) -> AdapterFit:
    """The adapter that brings `images` (N, H, W, 3) uint8, N >= 1, closest to `stats` (an ImageStats of
    the clean rig): offsets within `radius` pixels, each with the colour moments matched; see the module doc."""
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[0] < 1 or imgs.shape[-1] != 3:
        raise ValueError(f"images: expected (N>=1, H, W, 3) uint8, got {imgs.shape} {imgs.dtype}")
    if not isinstance(radius, int) or not 0 <= radius <= MAX_SHIFT:
        raise ValueError(f"radius: expected an int in [0, {MAX_SHIFT}], got {radius!r}")
    if len(imgs) > FIT_FRAMES:
        imgs = imgs[np.linspace(0, len(imgs) - 1, FIT_FRAMES).round().astype(int)]
    clean_mean, clean_std = np.asarray(stats.stats.mean[:3]), np.asarray(stats.stats.mean[3:6])
    # what a knocked camera uncovers is filled with the rig's border colour (the mean of the clean frames' four
    # 2-pixel border strips, fleet.control.image_ood), not with repeated scene: the encoder saw that border
    fill = tuple(float(v) for v in np.clip(np.asarray(stats.stats.mean[6:18]).reshape(4, 3).mean(0), 0.0, 1.0))
    lo, hi = GAIN_RANGE

    def mean_distance(frames: np.ndarray) -> float:
        return float(np.mean([stats.distance(f) for f in frames]))

    before = mean_distance(imgs)
    best: tuple[float, ImageAdapter] = (before, ImageAdapter())  # clean frames keep the identity
    offsets = sorted(
        ((dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)),
        key=lambda o: (abs(o[0]) + abs(o[1]), o),
    )
    scored: list[tuple[float, ImageAdapter]] = []
    for dx, dy in offsets:  # nearest first: a tie goes to the smaller offset, the data did not ask for more
        mean, std = _channel_moments(_placed(imgs, dx, dy, fill))
        gain = np.clip(clean_std / np.maximum(std, 1e-3), lo, hi)
        adapter = _with_gain(dx, dy, gain, mean, clean_mean, fill)
        d = mean_distance(adapter.apply(imgs))
        scored.append((d, adapter))
        if d < best[0] - 1e-9:
            best = (d, adapter)
    # the spread ratio is biased by what the scene holds (its objects cross colour cells differently): refine
    # the gain's overall scale at the chosen offset, keeping each channel's mean where the clean rig has it
    fitted = best[1]
    if not fitted.is_identity:
        mean, _ = _channel_moments(_placed(imgs, fitted.dx, fitted.dy, fill))
        for scale in GAIN_SCALES:
            gain = np.clip(np.asarray(fitted.gain) * scale, lo, hi)
            adapter = _with_gain(fitted.dx, fitted.dy, gain, mean, clean_mean, fill)
            d = mean_distance(adapter.apply(imgs))
            if d < best[0] - 1e-9:
                best = (d, adapter)
    # offsets around the chosen one, with its colours and with the colours left alone: the statistics place the
    # offset within a pixel, the corrections' loss then chooses among these (fleet.learning.vision_round)
    fitted = best[1]
    candidates: list[tuple[float, ImageAdapter]] = []
    for ddy in range(-NEAR, NEAR + 1):
        for ddx in range(-NEAR, NEAR + 1):
            dx, dy = fitted.dx + ddx, fitted.dy + ddy
            if max(abs(dx), abs(dy)) > MAX_SHIFT:
                continue
            for adapter in (ImageAdapter(dx, dy, fitted.gain, fitted.bias, fill), ImageAdapter(dx, dy, fill=fill)):
                if not adapter.is_identity and all(adapter != c for _, c in candidates):
                    d = best[0] if adapter == fitted else mean_distance(adapter.apply(imgs))
                    candidates.append((d, adapter))
    return AdapterFit(best[1], before, best[0], int(len(imgs)), tuple(candidates))


def adapted_policy(policy, adapter: ImageAdapter | None):
    """A ChunkPolicy (observations, names) -> chunks that reads every frame through `adapter` (None: `policy`)."""
    if adapter is None or adapter.is_identity:
        return policy

    def act(observations, names):
        return policy([{**o, "image": adapter.apply(np.asarray(o["image"]))} for o in observations], names)

    return act


__all__ = ["AdapterFit", "ImageAdapter", "adapted_policy", "fit_image_adapter", "shift_frames"]
