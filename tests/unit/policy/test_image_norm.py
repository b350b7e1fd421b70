"""Per-image normalization (`PolicyConfig.image_norm="per_image"`): a frame's own per-channel statistics
replace the fixed affine map, so a camera that is dimmer or colour-cast gives the encoder the same input.
Old checkpoints keep the fixed map bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fleet.policy.backbone import PolicyConfig
from fleet.policy.vision import NORM_MARGIN, NORM_MIN_STD, normalize_image
from fleet.sim import make_env
from fleet.sim.render import apply_lighting, apply_offset
from tests.mocks.tiny_policy import TINY


def frames(n: int = 4, seed: int = 0) -> torch.Tensor:
    """Real sim frames (one per body), so the statistics are those of the scenes the policy sees."""
    out = []
    for i, body in enumerate(("franka", "aloha", "hello", "leap")[:n]):
        obs, _ = make_env(body, seed=seed + i).reset(seed=seed + i)
        out.append(obs["image"])
    return torch.from_numpy(np.stack(out))


def test_fixed_is_the_shipped_affine_map() -> None:
    img = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    expected = (img.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    assert torch.allclose(normalize_image(img, "fixed"), expected, atol=1e-6)


def test_per_image_is_centred_and_unit_spread_on_the_centre() -> None:
    x = normalize_image(frames(), "per_image")
    centre = x[:, :, NORM_MARGIN:-NORM_MARGIN, NORM_MARGIN:-NORM_MARGIN].flatten(2)
    assert torch.allclose(centre.mean(-1), torch.zeros(4, 3), atol=1e-4)
    assert torch.allclose(centre.std(-1, correction=0), torch.ones(4, 3), atol=1e-3)


@pytest.mark.parametrize("gain,tint", [((0.55,) * 3, (40.0, 25.0, -10.0)), ((1.2, 0.9, 1.1), (-20.0, 5.0, 15.0))])
def test_a_gain_and_colour_cast_leave_the_input_unchanged(gain, tint) -> None:
    """The sims' `lighting` shift (gain 0.55, cast +40/+25/-10) and a white-balance change: the inputs agree to
    within the uint8 rounding of the shifted frame (a grey level, over the frame's spread)."""
    clean = frames()
    lit = torch.from_numpy(np.stack([apply_lighting(f, np.asarray(gain, np.float32), tint) for f in clean.numpy()]))
    a, b = normalize_image(clean, "per_image"), normalize_image(lit, "per_image")
    assert float((a - b).abs().mean()) < 0.02
    # the fixed map passes the change on: ten times the difference and more
    assert float((normalize_image(clean) - normalize_image(lit)).abs().mean()) > 0.2


def test_the_black_edge_of_a_shifted_camera_does_not_move_the_statistics() -> None:
    """`camera_offset` fills 4 columns and 3 rows with black: outside the centre the statistics are read from."""
    clean = frames()
    shifted = torch.from_numpy(np.stack([apply_offset(f, 4, -3) for f in clean.numpy()]))
    x = normalize_image(shifted, "per_image")
    centre = x[:, :, NORM_MARGIN:-NORM_MARGIN, NORM_MARGIN:-NORM_MARGIN].flatten(2)
    assert torch.allclose(centre.mean(-1), torch.zeros(4, 3), atol=1e-4)


def test_a_flat_frame_is_not_blown_up() -> None:
    flat = torch.full((1, 64, 64, 3), 120, dtype=torch.uint8)
    flat[0, 30, 30] = 124  # one pixel of sensor noise
    x = normalize_image(flat, "per_image")
    assert float(x.abs().max()) <= 4.0 / NORM_MIN_STD + 1e-6


def test_config_field_validated_and_old_configs_load_as_fixed() -> None:
    with pytest.raises(ValueError, match="image_norm"):
        dataclasses.replace(TINY, image_norm="batch")
    old = TINY.to_dict()
    old.pop("image_norm")
    assert PolicyConfig.from_dict(old).image_norm == "fixed"
    assert PolicyConfig.from_dict(dataclasses.replace(TINY, image_norm="per_image").to_dict()).image_norm == (
        "per_image"
    )


def test_a_per_image_model_acts_the_same_under_a_lighting_change() -> None:
    """End to end through the backbone: the image features of a lit frame equal the clean frame's within float
    and rounding error, for a model built with per_image; with the fixed map they move."""
    from fleet.policy.train import build_model

    names = ("franka", "aloha")
    clean = frames(2)
    lit = torch.from_numpy(np.stack([apply_lighting(f, np.float32(0.55), (40.0, 25.0, -10.0)) for f in clean.numpy()]))
    instr = torch.ones(2, TINY.max_instr_len, dtype=torch.long)
    moved = {}
    for norm in ("fixed", "per_image"):
        model = build_model(names, 0, dataclasses.replace(TINY, image_norm=norm)).eval()
        with torch.no_grad():
            a = model.backbone.vision_tokens(clean, instr)
            b = model.backbone.vision_tokens(lit, instr)
        moved[norm] = float((a - b).abs().mean() / a.abs().mean())
    assert moved["per_image"] < 0.02 < moved["fixed"]


def test_every_backend_serves_a_per_image_model() -> None:
    """ONNX (the normalization is traced into the graph) and the bf16 copy agree with eager fp32 on a per_image
    model, as they do on a fixed one (tests/unit/policy/inference/test_optimize.py)."""
    from fleet.policy.inference.backend import make_backend
    from fleet.policy.inference.onnx_backend import OnnxBackend
    from fleet.policy.train import build_model

    names = ("franka", "aloha")
    config = dataclasses.replace(TINY, keypoints=2, conv_stem=False, image_norm="per_image")
    model = build_model(names, 0, config).eval()
    imgs = frames(2)
    rng = np.random.default_rng(0)
    obs = [
        {
            "image": imgs[i].numpy(),
            "proprio": rng.standard_normal(model.specs[n].proprio_dim).astype(np.float32),
            "instruction": "pick up the red cube",
        }
        for i, n in enumerate(names)
    ]
    batch = model.collate(obs, list(names))

    def run(m):
        return m.predict(batch, n_samples=2, generator=torch.Generator().manual_seed(3))

    ref = run(model)
    for backend, tol in ((OnnxBackend(model, "fp32", threads=1), 1e-4), (make_backend(model, "torch", "bf16"), 0.1)):
        rows = run(backend)
        for a, b in zip(rows, ref, strict=True):
            assert np.abs(a["features"] - b["features"]).max() <= tol * max(1.0, np.abs(b["features"]).max())
