"""Per-robot image adapters (fleet.policy.image_adapter): the eight numbers, their validation, the whole-pixel
shift, the inverse of the simulator's `lighting` and `camera_offset` shifts, the label-free fit against a clean
rig's ImageStats, and the policy wrapper. No torch, no Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fleet.control.image_ood import ImageStats
from fleet.policy.image_adapter import (
    FIT_FRAMES,
    MAX_SHIFT,
    AdapterFit,
    ImageAdapter,
    adapted_policy,
    fit_image_adapter,
    shift_frames,
)
from fleet.sim import make_env
from fleet.sim.base import FleetEnv
from fleet.sim.render import apply_lighting, apply_offset

LIGHT_GAIN, LIGHT_TINT = FleetEnv.lighting  # (0.55, (40, 25, -10))
CAM_DX, CAM_DY = FleetEnv.camera_shift  # (4, -3)
RADIUS = 5  # offsets tried by the fits below, each way (121 instead of the default 169: same answers, faster)


def random_image(seed: int = 0, shape=(64, 64, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def lighting_inverse() -> ImageAdapter:
    """The exact colour inverse of the `lighting` shift (up to its uint8 rounding)."""
    g = 1.0 / LIGHT_GAIN
    return ImageAdapter(gain=(g, g, g), bias=tuple(-t * g / 255.0 for t in LIGHT_TINT))


# ---- ImageAdapter: values, shapes, validation ----------------------------------------------------------------


def test_identity_returns_the_frame_unchanged():
    """The default adapter is the identity and hands back the very same pixel values, shape and dtype."""
    img = random_image(1)
    adapter = ImageAdapter()
    assert adapter.is_identity
    out = adapter.apply(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    batch = random_image(2, (3, 64, 64, 3))
    np.testing.assert_array_equal(adapter.apply(batch), batch)


def test_non_identity_flags():
    """Any offset, gain or bias makes the adapter non-identity."""
    assert not ImageAdapter(dx=1).is_identity
    assert not ImageAdapter(dy=-1).is_identity
    assert not ImageAdapter(gain=(1.0, 1.0, 1.1)).is_identity
    assert not ImageAdapter(bias=(0.0, 0.01, 0.0)).is_identity


def test_apply_single_frame_is_gain_bias_then_clip():
    """On an (H, W, 3) frame: out = clip(rint(gain * in + bias * 255)) per channel, uint8."""
    img = np.array([[[0, 100, 200], [200, 128, 255], [10, 20, 0]]], np.uint8)  # (1, 3, 3)
    adapter = ImageAdapter(gain=(2.0, 1.0, 1.0), bias=(0.0, -0.2, 0.2))  # bias in [0, 1] units: -51, +51 levels
    out = adapter.apply(img)
    want = np.array([[[0, 49, 251], [255, 77, 255], [20, 0, 51]]], np.uint8)  # 400 and 306 clip to 255, -31 to 0
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, want)
    small = ImageAdapter(bias=(0.003, -0.003, 0.002)).apply(np.full((1, 1, 3), 100, np.uint8))  # +-0.765, +0.51
    np.testing.assert_array_equal(small[0, 0], [101, 99, 101])  # rounded to the nearest level, not truncated


def test_apply_batch_equals_apply_per_frame():
    """(N, H, W, 3) is N independent frames: the batch result equals applying frame by frame."""
    batch = random_image(3, (4, 64, 64, 3))
    adapter = ImageAdapter(dx=2, dy=-1, gain=(1.2, 0.9, 1.0), bias=(-0.05, 0.02, 0.0))
    out = adapter.apply(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8
    for i in range(len(batch)):
        np.testing.assert_array_equal(out[i], adapter.apply(batch[i]))
    assert not np.array_equal(out, batch)


@pytest.mark.parametrize("field", ["dx", "dy"])
@pytest.mark.parametrize("value", [MAX_SHIFT + 1, -(MAX_SHIFT + 1), 1.5, True, "2"])
def test_bad_offset_names_the_field(field, value):
    """An offset beyond MAX_SHIFT pixels, or not an int (a float, a bool, a string), names dx or dy."""
    with pytest.raises(ValueError, match=rf"ImageAdapter\.{field}"):
        ImageAdapter(**{field: value})


def test_offset_at_the_limit_and_numpy_ints_are_accepted():
    """+-MAX_SHIFT is allowed, and a numpy integer is stored as a plain int."""
    a = ImageAdapter(dx=np.int64(MAX_SHIFT), dy=-MAX_SHIFT)
    assert (a.dx, a.dy) == (MAX_SHIFT, -MAX_SHIFT) and type(a.dx) is int


@pytest.mark.parametrize(
    "gain",
    [(math.nan, 1.0, 1.0), (1.0, math.inf, 1.0), (0.1, 1.0, 1.0), (1.0, 1.0, 5.5), (1.0, 1.0), "abc", None],
)
def test_bad_gain_names_the_field(gain):
    """A gain that is non-finite, outside GAIN_RANGE, of the wrong length or not numbers names `gain`."""
    with pytest.raises(ValueError, match=r"ImageAdapter\.gain"):
        ImageAdapter(gain=gain)


@pytest.mark.parametrize("bias", [(0.0, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 1.5, 0.0), (math.nan, 0.0, 0.0)])
def test_bad_bias_names_the_field(bias):
    """A bias of the wrong length, beyond [-1, 1] or non-finite names `bias`."""
    with pytest.raises(ValueError, match=r"ImageAdapter\.bias"):
        ImageAdapter(bias=bias)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((8, 8, 3), np.float32),  # not uint8
        np.zeros((8, 8, 3), np.int64),
        np.zeros((8, 8, 4), np.uint8),  # not 3 channels
        np.zeros((8, 8), np.uint8),  # no channel axis
        np.zeros((1, 1, 8, 8, 3), np.uint8),  # too many axes
    ],
)
def test_bad_image_is_refused(image):
    """apply takes (H, W, 3) or (N, H, W, 3) uint8 only, also for a non-identity adapter."""
    for adapter in (ImageAdapter(), ImageAdapter(dx=1)):
        with pytest.raises(ValueError, match=r"image: expected"):
            adapter.apply(image)


def test_to_dict_from_dict_round_trip_through_json():
    """to_dict is plain JSON; from_dict of it gives back an equal adapter that maps frames identically."""
    a = ImageAdapter(dx=-3, dy=2, gain=(1.5, 0.8, 1.1), bias=(-0.2, 0.05, 0.1))
    d = json.loads(json.dumps(a.to_dict()))
    assert d == {"dx": -3, "dy": 2, "gain": [1.5, 0.8, 1.1], "bias": [-0.2, 0.05, 0.1]}
    b = ImageAdapter.from_dict(d)
    assert b == a
    img = random_image(4)
    np.testing.assert_array_equal(b.apply(img), a.apply(img))
    assert ImageAdapter.from_dict({}) == ImageAdapter()  # every key defaults to the identity's


def test_from_dict_refuses_unknown_keys_and_non_dicts():
    """An unknown key is named (a typo must not silently become the identity); a non-dict is refused."""
    with pytest.raises(ValueError, match=r"unknown keys \['zoom'\]"):
        ImageAdapter.from_dict({"dx": 1, "zoom": 2})
    with pytest.raises(ValueError, match=r"expected a dict"):
        ImageAdapter.from_dict([1, 2, 3])
    with pytest.raises(ValueError, match=r"ImageAdapter\.gain"):
        ImageAdapter.from_dict({"gain": [1.0, 1.0, 99.0]})  # the values are validated too


# ---- shift_frames and the simulator's shifts -------------------------------------------------------------------


def test_shift_frames_reads_y_plus_dy_x_plus_dx_with_edges_repeated():
    """out(y, x) = in(y + dy, x + dx); pixels read from outside the frame repeat the nearest edge pixel."""
    img = (10 * np.arange(3)[:, None] + np.arange(4)[None, :]).astype(np.uint8)[:, :, None]  # in(y, x) = 10y + x
    out = shift_frames(img, dx=1, dy=-1)
    want = np.array([[1, 2, 3, 3], [1, 2, 3, 3], [11, 12, 13, 13]], np.uint8)[:, :, None]
    np.testing.assert_array_equal(out, want)
    out = shift_frames(img, dx=-2, dy=2)
    want = np.array([[20, 20, 20, 21], [20, 20, 20, 21], [20, 20, 20, 21]], np.uint8)[:, :, None]
    np.testing.assert_array_equal(out, want)
    batch = np.stack([img, img + 100])  # (N, H, W, C): the same shift per frame
    np.testing.assert_array_equal(shift_frames(batch, 1, -1)[1], shift_frames(img + 100, 1, -1))
    assert shift_frames(img, 0, 0) is img


def test_adapter_undoes_the_camera_offset_pixel_exactly_on_the_interior():
    """apply_offset(img, 4, -3) is undone by ImageAdapter(dx=4, dy=-3): every pixel the shift did not push out
    of the frame comes back exactly; the rows and columns it lost repeat the nearest kept pixel, never the fill."""
    img = random_image(5)
    shifted = apply_offset(img, CAM_DX, CAM_DY, fill=(0, 0, 0))
    restored = ImageAdapter(dx=CAM_DX, dy=CAM_DY).apply(shifted)
    h, w = img.shape[:2]
    rows = slice(max(-CAM_DY, 0), h - max(CAM_DY, 0))  # rows 3..63
    cols = slice(max(-CAM_DX, 0), w - max(CAM_DX, 0))  # cols 0..59
    np.testing.assert_array_equal(restored[rows, cols], img[rows, cols])
    np.testing.assert_array_equal(restored[:3, :60], np.broadcast_to(img[3, :60], (3, 60, 3)))  # edge repeated
    np.testing.assert_array_equal(restored[3:, 60:], np.broadcast_to(img[3:, 59:60], (61, 4, 3)))
    assert not np.array_equal(ImageAdapter(dx=-CAM_DX, dy=-CAM_DY).apply(shifted)[rows, cols], img[rows, cols])


def test_adapter_undoes_the_lighting_within_a_few_grey_levels():
    """The colour inverse of apply_lighting (gain 1/0.55, bias -tint/0.55) restores every unclipped pixel to
    within 2 grey levels (the shift truncates to uint8, the inverse multiplies that by 1/0.55)."""
    img = random_image(6)
    lit = apply_lighting(img, LIGHT_GAIN, LIGHT_TINT)
    restored = lighting_inverse().apply(lit)
    exact = img.astype(np.float32) * LIGHT_GAIN + np.asarray(LIGHT_TINT, np.float32)
    unclipped = (exact >= 0) & (exact <= 255)
    assert unclipped.mean() > 0.9
    err = np.abs(restored.astype(int) - img.astype(int))[unclipped]
    assert err.max() <= 2, err.max()
    assert np.abs(lit.astype(int) - img.astype(int))[unclipped].max() > 50  # the shift itself is far from it


# ---- fit_image_adapter on the franka simulator -----------------------------------------------------------------


def franka_frames(shift, seeds) -> np.ndarray:
    """The first camera frame of franka episodes `seeds`, under `shift`."""
    return np.stack([make_env("franka", shift=shift).reset(seed=int(s))[0]["image"] for s in seeds])


@pytest.fixture(scope="module")
def clean_stats() -> ImageStats:
    """ImageStats of 40 clean franka frames (seeds 100..139, apart from the frames the fits read)."""
    return ImageStats.fit(franka_frames(None, range(100, 140)))


@pytest.fixture(scope="module")
def fitted(clean_stats):
    """fitted(shift): the adapter fitted to 8 franka frames (seeds 0..7) under `shift`, one fit per shift."""
    fits: dict = {}

    def get(shift: str | None) -> AdapterFit:
        if shift not in fits:
            fits[shift] = fit_image_adapter(franka_frames(shift, range(8)), clean_stats, radius=RADIUS)
        return fits[shift]

    return get


def test_fit_finds_the_camera_offset(fitted):
    """Frames from a camera knocked by (4, -3) pixels: the fit finds dx=4, dy=-3 with about unit gains and
    brings the frames much closer to the clean rig."""
    fit = fitted("camera_offset")
    assert (fit.adapter.dx, fit.adapter.dy) == (CAM_DX, CAM_DY)
    np.testing.assert_allclose(fit.adapter.gain, 1.0, atol=0.1)
    assert fit.frames == 8
    assert fit.distance_before > 10
    assert fit.distance_after < fit.distance_before / 2


def test_fit_brings_camera_offset_frames_back_in_distribution(fitted):
    """After the fitted (4, -3) adapter the knocked frames read as in distribution (distance < 3)."""
    fit = fitted("camera_offset")
    assert fit.distance_after < 3.0 < fit.distance_before


def test_fit_finds_the_lighting_gain(fitted):
    """Frames under the dimmer, warmer light: no offset, and per-channel gains near 1/0.55 (within 15%) that
    bring the frames from far out of distribution close to the clean rig."""
    fit = fitted("lighting")
    assert (fit.adapter.dx, fit.adapter.dy) == (0, 0)
    np.testing.assert_allclose(fit.adapter.gain, 1.0 / LIGHT_GAIN, rtol=0.15)
    assert fit.distance_before > 30
    assert fit.distance_after < fit.distance_before / 10


def test_fit_brings_lighting_frames_back_in_distribution(fitted):
    """After the fitted adapter the dimmed frames read as in distribution (distance < 3)."""
    fit = fitted("lighting")
    assert fit.distance_after < 3.0 < fit.distance_before


def test_fit_on_clean_frames_keeps_offset_and_colours(fitted):
    """Clean frames: no offset, gains within 10% of 1 and biases small."""
    fit = fitted(None)
    assert (fit.adapter.dx, fit.adapter.dy) == (0, 0)
    np.testing.assert_allclose(fit.adapter.gain, 1.0, rtol=0.1)
    np.testing.assert_allclose(fit.adapter.bias, 0.0, atol=0.1)
    assert fit.distance_before < 1.5


def test_fit_never_makes_clean_frames_worse(fitted):
    """The fitted adapter is at least as close to the clean rig as the frames without one."""
    fit = fitted(None)
    assert fit.distance_after <= fit.distance_before + 1e-9


def test_fit_reads_at_most_fit_frames(clean_stats):
    """More than FIT_FRAMES frames: an evenly spread FIT_FRAMES of them are read (radius 0 keeps it quick)."""
    frames = np.repeat(franka_frames(None, range(2)), FIT_FRAMES, axis=0)
    fit = fit_image_adapter(frames, clean_stats, radius=0)
    assert fit.frames == FIT_FRAMES and (fit.adapter.dx, fit.adapter.dy) == (0, 0)


@pytest.mark.parametrize(
    "images, radius, match",
    [
        (np.zeros((2, 64, 64, 3), np.float32), 1, r"images: expected"),
        (np.zeros((0, 64, 64, 3), np.uint8), 1, r"images: expected"),
        (np.zeros((64, 64, 3), np.uint8), 1, r"images: expected"),  # one frame without the batch axis
        (np.zeros((2, 64, 64, 3), np.uint8), MAX_SHIFT + 1, r"radius"),
        (np.zeros((2, 64, 64, 3), np.uint8), 1.0, r"radius"),
        (np.zeros((2, 64, 64, 3), np.uint8), -1, r"radius"),
    ],
)
def test_fit_refuses_bad_input(clean_stats, images, radius, match):
    """fit_image_adapter names the bad argument: frames that are not (N>=1, H, W, 3) uint8, a bad radius."""
    with pytest.raises(ValueError, match=match):
        fit_image_adapter(images, clean_stats, radius=radius)


# ---- adapted_policy --------------------------------------------------------------------------------------------


class RecordingPolicy:
    """A ChunkPolicy that records the observations and names it was called with."""

    def __init__(self):
        self.calls: list[tuple[list[dict], list[str]]] = []

    def __call__(self, observations, names):
        self.calls.append((observations, names))
        return [np.zeros((2, 7), np.float32) + i for i in range(len(observations))]


def test_adapted_policy_passes_adapted_frames():
    """The wrapped policy reads every frame through the adapter; proprio, instruction and names pass as they
    are, the robot's observations are not modified, and the policy's chunks come back unchanged."""
    inner = RecordingPolicy()
    adapter = ImageAdapter(dx=CAM_DX, dy=CAM_DY, gain=(1.1, 1.0, 0.9))
    frames = [random_image(7), random_image(8)]
    obs = [{"image": f.copy(), "proprio": np.arange(3.0) + i, "instruction": f"pick {i}"} for i, f in enumerate(frames)]
    chunks = adapted_policy(inner, adapter)(obs, ["franka", "franka"])
    assert len(inner.calls) == 1
    seen, names = inner.calls[0]
    assert names == ["franka", "franka"]
    for o, s, f in zip(obs, seen, frames, strict=True):
        np.testing.assert_array_equal(s["image"], adapter.apply(f))
        assert s["instruction"] == o["instruction"]
        np.testing.assert_array_equal(s["proprio"], o["proprio"])
        np.testing.assert_array_equal(o["image"], f)  # the caller's observation keeps the camera's frame
    assert [float(c[0, 0]) for c in chunks] == [0.0, 1.0]


@pytest.mark.parametrize("adapter", [None, ImageAdapter(), ImageAdapter.from_dict({"dx": 0})])
def test_adapted_policy_without_an_adapter_is_the_policy_itself(adapter):
    """No adapter, or the identity: the policy is returned as it is, no wrapper in the serving path."""
    inner = RecordingPolicy()
    assert adapted_policy(inner, adapter) is inner


def test_uncovered_pixels_take_the_fill_colour_and_the_dict_carries_it():
    """With `fill`, the strip an offset uncovers is that colour (not colour-corrected); the rest is shifted
    and corrected as without it; to_dict/from_dict carry it and validate it."""
    img = np.full((8, 8, 3), 100, np.uint8)
    a = ImageAdapter(dx=2, dy=-1, gain=(2.0, 2.0, 2.0), fill=(0.0, 0.5, 1.0))
    out = a.apply(img)
    assert (out[:, 6:] == [0, 128, 255]).all() and (out[:1] == [0, 128, 255]).all()
    assert (out[1:, :6] == 200).all()
    assert ImageAdapter.from_dict(a.to_dict()) == a and "fill" not in ImageAdapter(dx=1).to_dict()
    with pytest.raises(ValueError, match="fill"):
        ImageAdapter(dx=1, fill=(0.0, 2.0, 0.0))
