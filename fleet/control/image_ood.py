"""A model-free out-of-distribution signal from the raw camera image: is this the camera, light and table
the robot was trained with?

The backbone-feature distance (FeatureStats on the pooled transformer feature) is trained to ignore what
does not matter for the action, so it can stay quiet while the light or the camera pose has changed and
the policy is failing. These statistics look at the pixels themselves: per-channel mean and spread of the
whole frame (dimming, colour cast), the mean colour of each 2-pixel border strip (a knocked camera shows
the black fill of the uncovered strip, and the fixed background changes colour under new light), and a
coarse colour histogram (clutter in colours the rig never shows). A Mahalanobis distance against the
statistics of clean teleoperation frames (`FeatureStats`, shrunk covariance) turns them into one number,
about 1 in distribution, like the feature distance, so the same thresholds read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleet.control.confidence import FeatureStats

BORDER = 2  # pixels per border strip
HIST_BINS = 4  # per channel: 4 x 4 x 4 colour cells
N_FEATURES = 3 + 3 + 4 * 3 + HIST_BINS**3


def image_features(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (N_FEATURES,) float64: channel means and stds, border-strip means, colour histogram
    (share of pixels per cell, square-rooted so that a few pixels of a new colour stand out)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] <= 2 * BORDER or img.shape[1] <= 2 * BORDER:
        raise ValueError(f"image: expected shape (H, W, 3) with H, W > {2 * BORDER}, got {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8, got {img.dtype}")
    x = img.astype(np.float64) / 255.0
    flat = x.reshape(-1, 3)
    strips = [x[:BORDER], x[-BORDER:], x[:, :BORDER], x[:, -BORDER:]]
    q = (img.reshape(-1, 3).astype(np.int64) * HIST_BINS) // 256
    cells = np.bincount((q[:, 0] * HIST_BINS + q[:, 1]) * HIST_BINS + q[:, 2], minlength=HIST_BINS**3)
    hist = np.sqrt(cells / flat.shape[0])
    return np.concatenate([flat.mean(0), flat.std(0), np.concatenate([s.reshape(-1, 3).mean(0) for s in strips]), hist])


@dataclass(frozen=True)
class ImageStats:
    """Statistics of one embodiment's clean camera frames; `distance(image)` is ~1 in distribution."""

    stats: FeatureStats

    @classmethod
    def fit(cls, images: np.ndarray, shrinkage: float = 0.1) -> ImageStats:
        """Fit on (N, H, W, 3) uint8 clean frames, N >= 2."""
        imgs = np.asarray(images)
        if imgs.ndim != 4 or imgs.shape[0] < 2:
            raise ValueError(f"images: expected shape (N>=2, H, W, 3), got {imgs.shape}")
        return cls(FeatureStats.fit(np.stack([image_features(im) for im in imgs]), shrinkage=shrinkage))

    def distance(self, image: np.ndarray) -> float:
        return self.stats.distance(image_features(image))

    def to_dict(self) -> dict:
        return self.stats.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> ImageStats:
        return cls(FeatureStats.from_dict(d))


def fit_image_stats(body: str, episodes: int = 200, seed: int = 0) -> ImageStats:
    """ImageStats of `body` from the frames of `episodes` clean expert episodes (training-side seeds:
    `collect` seeds, never the evaluation block), a few states per episode."""
    from fleet.policy.demos import collect

    demos = collect(body, episodes, seed=seed, keep=0.25)
    return ImageStats.fit(demos.images)


def write_image_stats(checkpoint, stats: dict[str, ImageStats]) -> Path:
    """Store per-body statistics in a checkpoint's JSON metadata (`extra.image_stats`), where `fleet up`'s
    robots and `fleet experiment robustness` find them; the weights file is untouched. Returns the JSON path."""
    from fleet.cluster.launcher import checkpoint_meta
    from fleet.durable import write_text_atomic

    prefix, meta = checkpoint_meta(None if checkpoint is None else str(checkpoint))
    path = Path(prefix).with_name(Path(prefix).name + ".json")
    extra = meta.setdefault("extra", {})
    extra["image_stats"] = (extra.get("image_stats") or {}) | {body: s.to_dict() for body, s in stats.items()}
    write_text_atomic(path, json.dumps(meta, indent=1))  # as save_checkpoint writes it; never half a file
    return path
