"""Training-time augmentation: the sims' own shift machinery, the focus target moved with the image,
and the evaluation shifts held out of the random ranges."""

import numpy as np
import pytest
import torch

from fleet.policy.augment import (
    CLUTTER_MIN_COLOR_DISTANCE,
    DISTRACTOR_COLORS,
    AugmentConfig,
    RowShift,
    apply_shift,
    augment_batch,
    held_out_report,
    sample_shift,
)
from fleet.policy.batch import PolicyBatch
from fleet.sim import make_env
from fleet.sim.base import FleetEnv

BODIES = ("franka", "aloha", "hello", "leap")


def _pair(body: str, shift: str, seed: int, offset=None):
    """(clean env, shifted env) on the same scene, the shifted one's camera offset overridden if given."""
    clean = make_env(body)
    shifted = make_env(body, shift=shift)
    if offset is not None:
        shifted.unwrapped.camera_shift = offset
    clean.reset(seed=seed)
    shifted.reset(seed=seed)
    return clean.unwrapped, shifted.unwrapped


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("offset", [(3, -2), (-3, 3), (0, 1), (-1, 0)])
def test_offset_moves_image_and_focus_exactly_as_a_knocked_camera(body, offset):
    clean, shifted = _pair(body, "camera_offset", seed=11, offset=offset)
    img, focus = apply_shift(clean.render(), clean.focus(), RowShift(offset=offset))
    np.testing.assert_array_equal(img, shifted.render())
    # the same pixel, in [-1, 1] image coordinates: equal up to float32 rounding (1e-6 of the half-width)
    np.testing.assert_allclose(focus, shifted.focus(), rtol=0, atol=1e-6)
    # and the focus still points at the instructed object's pixel in the shifted image
    px = (focus + 1) * 32
    np.testing.assert_allclose(px - (clean.focus() + 1) * 32, offset, atol=1e-4)


@pytest.mark.parametrize("body", BODIES)
def test_the_sims_combined_shift_is_reproduced_in_the_sims_order(body):
    clean, shifted = _pair(body, "distractors+lighting+camera_offset", seed=5)
    state = clean._state
    gain, tint = FleetEnv.lighting
    s = RowShift(
        clutter=tuple(("cross", x, y, r, col) for x, y, r, col in state["distractors"]),
        gain=(gain,) * 3,
        tint=tint,
        offset=FleetEnv.camera_shift,
    )
    img, focus = apply_shift(clean.render(), clean.focus(), s)
    np.testing.assert_array_equal(img, shifted.render())
    np.testing.assert_allclose(focus, shifted.focus(), rtol=0, atol=1e-6)


def test_evaluation_shifts_lie_outside_the_training_ranges():
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    shifts = [sample_shift(rng, cfg) for _ in range(4000)]
    gains = np.array([s.gain for s in shifts if s.gain is not None])
    tints = np.array([s.tint for s in shifts if s.tint is not None])
    offsets = np.array([s.offset for s in shifts if s.offset is not None])
    colours = np.array([c[4] for s in shifts if s.clutter for c in s.clutter], np.float64)
    assert len(gains) > 1000 and len(offsets) > 1000 and len(colours) > 500
    eval_gain, eval_tint = FleetEnv.lighting
    assert gains.min() > eval_gain  # every channel brighter than the `lighting` shift's gain
    assert np.abs(tints[:, 0]).max() < eval_tint[0]  # its red cast is never reached
    assert np.abs(offsets).max() == cfg.max_offset < abs(FleetEnv.camera_shift[0])  # its dx is never reached
    assert not ((offsets == 0).all(1)).any()  # a drawn offset always moves the image
    dist = np.sqrt(((colours[:, None, :] - np.array(DISTRACTOR_COLORS)[None]) ** 2).sum(-1))
    assert dist.min() >= CLUTTER_MIN_COLOR_DISTANCE  # the `distractors` shift's colours are never drawn
    report = held_out_report(cfg)
    assert report["lighting"]["gain_beyond"] and report["lighting"]["tint_beyond_channels"] == ["r"]
    assert report["camera_offset"]["beyond_axes"] == ["x"]


def _batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PolicyBatch(
        torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8),
        torch.randn(n, 9, generator=g),
        torch.zeros(n, 8, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        ["franka"] * n,
        torch.randn(n, 16, 7, generator=g),
        focus=torch.rand(n, 2, generator=g) * 2 - 1,
    )


def test_augment_batch_changes_images_and_focus_only_as_each_row_says_and_is_reproducible():
    b = _batch()
    before = b.image.clone()
    out, shifts = augment_batch(b, torch.Generator().manual_seed(3), AugmentConfig())
    assert torch.equal(b.image, before)  # the stored demonstrations are never modified in place
    assert out.proprio is b.proprio and out.actions is b.actions and out.instr_ids is b.instr_ids
    kinds = set()
    for i, s in enumerate(shifts):
        img, f = apply_shift(b.image[i].numpy(), b.focus[i].numpy(), s)
        np.testing.assert_array_equal(out.image[i].numpy(), img)
        np.testing.assert_array_equal(out.focus[i].numpy(), f)
        if s.offset is None:
            assert torch.equal(out.focus[i], b.focus[i])
        if s == RowShift():
            assert torch.equal(out.image[i], b.image[i])
        kinds |= {k for k in ("clutter", "gain", "offset") if getattr(s, k)}
    assert kinds == {"clutter", "gain", "offset"}
    again, _ = augment_batch(b, torch.Generator().manual_seed(3), AugmentConfig())
    assert torch.equal(again.image, out.image) and torch.equal(again.focus, out.focus)


def test_no_augmentation_at_zero_probability():
    b = _batch(8)
    out, _ = augment_batch(b, torch.Generator().manual_seed(0), AugmentConfig(p_lighting=0, p_offset=0, p_clutter=0))
    assert torch.equal(out.image, b.image) and torch.equal(out.focus, b.focus)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"p_offset": 1.5}, "p_offset"),
        ({"gain": (0.0, 1.0)}, "gain"),
        ({"max_offset": 40}, "max_offset"),
        ({"clutter": (3, 1)}, "clutter"),
        ({"tint": float("nan")}, "tint"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AugmentConfig.{field}"):
        AugmentConfig(**kwargs)
