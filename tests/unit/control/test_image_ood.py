"""Raw-image OOD statistics: ~1 on clean frames of the rig, far above on the everyday shifts."""

import numpy as np
import pytest

from fleet.control.image_ood import N_FEATURES, ImageStats, fit_image_stats, image_features
from fleet.sim import make_env


@pytest.fixture(scope="module")
def franka_stats():
    return fit_image_stats("franka", episodes=40, seed=777)


def _first_frames(shift, n=12):
    out = []
    for i in range(n):
        env = make_env("franka", shift=shift)
        obs, _ = env.reset(seed=90_000 + i)  # scenes the statistics were not fit on
        out.append(obs["image"])
    return out


def test_features_shape_and_range():
    f = image_features(np.full((64, 64, 3), 255, np.uint8))
    assert f.shape == (N_FEATURES,) and np.isfinite(f).all()
    assert f[:3].tolist() == [1.0, 1.0, 1.0] and f[3:6].tolist() == [0.0, 0.0, 0.0]
    assert f[-1] == 1.0 and f[18:-1].sum() == 0.0  # every pixel in the brightest colour cell


@pytest.mark.parametrize("shift", ["lighting", "camera_offset", "distractors"])
def test_every_everyday_shift_scores_above_every_clean_frame(franka_stats, shift):
    clean = [franka_stats.distance(im) for im in _first_frames(None)]
    shifted = [franka_stats.distance(im) for im in _first_frames(shift)]
    assert max(clean) < 3.0  # the confidence's novelty threshold
    assert min(shifted) > max(clean)


def test_round_trip(franka_stats):
    back = ImageStats.from_dict(franka_stats.to_dict())
    im = _first_frames("lighting", 1)[0]
    assert back.distance(im) == franka_stats.distance(im)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((64, 64), np.uint8), "shape"),
        (np.zeros((64, 64, 3), np.float32), "dtype uint8"),
        (np.zeros((3, 3, 3), np.uint8), "shape"),
    ],
)
def test_bad_image_is_named(image, match):
    with pytest.raises(ValueError, match=f"image: expected .*{match}"):
        image_features(image)


def test_fit_needs_frames():
    with pytest.raises(ValueError, match="images: expected"):
        ImageStats.fit(np.zeros((1, 64, 64, 3), np.uint8))
