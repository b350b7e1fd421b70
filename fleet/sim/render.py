"""Tiny numpy rasterizer for the 64x64 top-down cameras: filled shapes, lighting, camera offset.

Every shape is drawn into a bounding-box window only, so a frame with a handful of objects costs
tens of microseconds. Coordinates are pixels (float), x to the right, y down.
"""

from __future__ import annotations

import numpy as np

SIZE = 64

# RGB of every colour word an instruction may use. The first block is what pretraining sees; the
# second is held out ("novel_object"): the words exist in the vocabulary, the colours never appear.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
    "purple": (140, 50, 200),
    "orange": (250, 135, 20),
    "cyan": (40, 210, 220),
    "pink": (245, 140, 190),
}
TRAIN_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
NOVEL_COLORS: tuple[str, ...] = ("purple", "orange", "cyan", "pink")

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def blank(color: tuple[int, int, int]) -> np.ndarray:
    """A (64, 64, 3) uint8 frame filled with one colour."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = color
    return img


def _window(cx: float, cy: float, r: float) -> tuple[slice, slice] | None:
    x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), SIZE)
    y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), SIZE)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _paint(img: np.ndarray, win: tuple[slice, slice], mask: np.ndarray, color) -> None:
    img[win][mask] = color


def disk(img: np.ndarray, cx: float, cy: float, r: float, color) -> None:
    win = _window(cx, cy, r)
    if win is None:
        return
    dx, dy = _XX[win] - cx, _YY[win] - cy
    _paint(img, win, dx * dx + dy * dy <= r * r, color)


def ring(img: np.ndarray, cx: float, cy: float, r: float, color, inner: float = 0.5) -> None:
    win = _window(cx, cy, r)
    if win is None:
        return
    dx, dy = _XX[win] - cx, _YY[win] - cy
    d2 = dx * dx + dy * dy
    _paint(img, win, (d2 <= r * r) & (d2 >= (inner * r) ** 2), color)


def box(img: np.ndarray, cx: float, cy: float, hx: float, hy: float, angle: float, color) -> None:
    """Filled rectangle of half-sizes (hx, hy) rotated by `angle` radians."""
    r = float(np.hypot(hx, hy))
    win = _window(cx, cy, r)
    if win is None:
        return
    dx, dy = _XX[win] - cx, _YY[win] - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    _paint(img, win, (np.abs(u) <= hx) & (np.abs(v) <= hy), color)


def triangle(img: np.ndarray, cx: float, cy: float, r: float, color) -> None:
    """Upward-pointing filled triangle inscribed in a circle of radius r."""
    win = _window(cx, cy, r)
    if win is None:
        return
    dx, dy = _XX[win] - cx, _YY[win] - cy
    # three half-planes of an equilateral triangle with apex up
    m = (dy >= -r) & (dy <= 0.5 * r) & (np.abs(dx) * 1.732 <= (dy + r))
    _paint(img, win, m, color)


def star(img: np.ndarray, cx: float, cy: float, r: float, color) -> None:
    """Five-pointed star: a radius that oscillates with angle."""
    win = _window(cx, cy, r)
    if win is None:
        return
    dx, dy = _XX[win] - cx, _YY[win] - cy
    ang = np.arctan2(dy, dx)
    rad = r * (0.55 + 0.45 * np.cos(5 * ang))
    _paint(img, win, dx * dx + dy * dy <= rad * rad, color)


def cross(img: np.ndarray, cx: float, cy: float, r: float, color, width: float = 0.8) -> None:
    box(img, cx, cy, r, width, 0.0, color)
    box(img, cx, cy, width, r, 0.0, color)


SHAPES = {"cube": "box", "sphere": "disk", "cone": "triangle", "ring": "ring", "star": "star"}
TRAIN_SHAPES: tuple[str, ...] = ("cube", "sphere", "cone")
NOVEL_SHAPES: tuple[str, ...] = ("ring", "star")


def shape(img: np.ndarray, name: str, cx: float, cy: float, r: float, color) -> None:
    """Draw a named object shape (see SHAPES)."""
    kind = SHAPES[name]
    if kind == "box":
        box(img, cx, cy, r * 0.85, r * 0.85, 0.0, color)
    elif kind == "disk":
        disk(img, cx, cy, r, color)
    elif kind == "triangle":
        triangle(img, cx, cy, r * 1.1, color)
    elif kind == "ring":
        ring(img, cx, cy, r * 1.05, color, inner=0.45)
    else:
        star(img, cx, cy, r * 1.25, color)


def apply_lighting(img: np.ndarray, gain: float, tint: tuple[float, float, float]) -> np.ndarray:
    """Dim or brighten the frame and add a colour cast (the `lighting` shift)."""
    out = img.astype(np.float32) * gain + np.asarray(tint, dtype=np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def apply_offset(img: np.ndarray, dx: int, dy: int, fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Shift the frame by whole pixels (the `camera_offset` shift); uncovered pixels get `fill`."""
    out = np.empty_like(img)
    out[:] = fill
    src_y = slice(max(-dy, 0), SIZE - max(dy, 0))
    dst_y = slice(max(dy, 0), SIZE - max(-dy, 0))
    src_x = slice(max(-dx, 0), SIZE - max(dx, 0))
    dst_x = slice(max(dx, 0), SIZE - max(-dx, 0))
    out[dst_y, dst_x] = img[src_y, src_x]
    return out
