"""The distribution shifts: parsing, what each one changes (and nothing else), novel objects, composition."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.sim import SHIFTS, make_env, parse_shift, render
from fleet.sim.leap import NOVEL_OBJECTS, OBJECTS, TRAIN_OBJECTS
from tests.mocks.sim_helpers import NAMES, assert_tree_equal, mid_action
from tests.unit.sim.helpers import ALL_SHIFTS, random_actions


def _pair(name: str, shift, seed: int):
    """The same episode without and with `shift`, both reset."""
    plain, shifted = make_env(name), make_env(name, shift=shift)
    return plain, plain.reset(seed=seed)[0], shifted, shifted.reset(seed=seed)[0]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_shift_raises_naming_it(name):
    for shift in ("gravity", "lighting+gravity", ["lighting", "gravity"]):
        with pytest.raises(ValueError, match="gravity") as exc:
            make_env(name, shift=shift)
        assert "lighting" in str(exc.value)  # lists the known shifts


def test_parse_shift_forms():
    assert parse_shift(None) == parse_shift("") == parse_shift("none") == frozenset()
    both = frozenset({"lighting", "actuator_bias"})
    assert parse_shift("lighting+actuator_bias") == both
    assert parse_shift("actuator_bias, lighting") == both
    assert parse_shift(["lighting", "actuator_bias"]) == both
    assert parse_shift(ALL_SHIFTS) == frozenset(SHIFTS)
    with pytest.raises(ValueError, match="Lighting"):
        parse_shift("Lighting")


@pytest.mark.parametrize("shift", ["lighting", "camera_offset", "distractors", "actuator_bias"])
@pytest.mark.parametrize("name", NAMES)
def test_observation_shifts_keep_the_episode(name, shift):
    """Shifts other than novel_object draw the same episode: equal state, proprio and instruction."""
    plain, o1, shifted, o2 = _pair(name, shift, seed=31)
    assert shifted.unwrapped.shifts == frozenset({shift})
    assert_tree_equal(plain.unwrapped._state, shifted.unwrapped._state, "state")
    np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
    assert o1["instruction"] == o2["instruction"]
    if shift == "actuator_bias":
        np.testing.assert_array_equal(o1["image"], o2["image"])
    else:
        assert not np.array_equal(o1["image"], o2["image"])


def _colors(img: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(c) for c in px) for px in np.unique(img.reshape(-1, 3), axis=0)}


def _novel_item(name: str, instruction: str) -> tuple[str, tuple[int, int, int]]:
    """The out-of-training word the instruction names and the colour it must be drawn in."""
    words = instruction.split()
    if name == "leap":
        found = [w for w in words if w in NOVEL_OBJECTS]
        assert found, f"leap novel instruction {instruction!r} names no novel object"
        return found[0], render.PALETTE[OBJECTS[found[0]][2]]
    found = [w for w in words if w in render.NOVEL_COLORS]
    assert found, f"{name} novel instruction {instruction!r} names no novel colour"
    return found[0], render.PALETTE[found[0]]


@pytest.mark.parametrize("name", NAMES)
def test_novel_object(name):
    novel_words = set(render.NOVEL_COLORS) | set(NOVEL_OBJECTS) | set(render.NOVEL_SHAPES)
    novel_rgb = {render.PALETTE[c] for c in render.NOVEL_COLORS}
    # in distribution: no novel word in any instruction, no novel colour in any frame
    seen: set[tuple[int, int, int]] = set()
    env = make_env(name)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        assert not set(obs["instruction"].split()) & novel_words, obs["instruction"]
        frames, done = [obs["image"]], False
        while not done:
            obs, _, term, trunc, _ = env.step(env.unwrapped.expert_action())
            frames.append(obs["image"])
            done = term or trunc
        for f in frames:
            seen |= _colors(f)
    assert not seen & novel_rgb
    if name == "leap":
        for seed in range(40):
            assert env.reset(seed=seed)[0]["instruction"].split()[-1] in TRAIN_OBJECTS
    # novel_object: every instruction names something outside the training set, drawn in an unseen colour
    env = make_env(name, shift="novel_object")
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        _word, rgb = _novel_item(name, obs["instruction"])
        colors = _colors(obs["image"])
        assert rgb in colors, f"seed {seed}: {obs['instruction']!r} but {rgb} is not in the image"
        assert rgb not in seen
        assert colors - seen, "the novel image contains no colour unseen in distribution"


@pytest.mark.parametrize("name", NAMES)
def test_lighting_darkens_and_tints_only_the_image(name):
    plain, o1, lit, o2 = _pair(name, "lighting", seed=41)
    for _ in range(3):
        gain, tint = lit.unwrapped.lighting
        img, ref = o2["image"].astype(float), o1["image"].astype(float)
        np.testing.assert_array_equal(o2["image"], render.apply_lighting(o1["image"], gain, tint))
        assert img.mean() < ref.mean(), "lighting did not darken the image"
        # warm cast: red rises relative to blue
        assert img[..., 0].mean() - img[..., 2].mean() > ref[..., 0].mean() - ref[..., 2].mean()
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        assert_tree_equal(plain.unwrapped._state, lit.unwrapped._state, "state")
        a = plain.unwrapped.expert_action()
        np.testing.assert_array_equal(a, lit.unwrapped.expert_action())
        o1, o2 = plain.step(a)[0], lit.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_camera_offset_shifts_by_declared_pixels(name):
    plain, o1, cam, o2 = _pair(name, "camera_offset", seed=51)
    dx, dy = cam.unwrapped.camera_shift
    assert (dx, dy) != (0, 0)
    for _ in range(3):
        ref, img = o1["image"], o2["image"]
        ys, xs = np.mgrid[0:64, 0:64]
        sy, sx = ys - dy, xs - dx  # the source pixel of every output pixel
        inside = (sy >= 0) & (sy < 64) & (sx >= 0) & (sx < 64)
        expected = np.zeros_like(ref)
        expected[inside] = ref[sy[inside], sx[inside]]
        np.testing.assert_array_equal(img, expected)
        assert (~inside).sum() == 64 * abs(dx) + 64 * abs(dy) - abs(dx * dy)
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        a = plain.unwrapped.expert_action()
        o1, o2 = plain.step(a)[0], cam.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_distractors_add_pixels_only(name):
    plain, o1, cl, o2 = _pair(name, "distractors", seed=61)
    for _ in range(3):
        diff = (o1["image"] != o2["image"]).any(axis=-1)
        assert 5 <= diff.sum() < 0.25 * diff.size, diff.sum()
        # every changed pixel lies on one of the episode's distractors and has a distractor colour
        near = np.zeros_like(diff)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        colors = set()
        for x, y, r, col in cl.unwrapped._state["distractors"]:
            near |= (np.abs(xs - x) <= r + 1.5) & (np.abs(ys - y) <= r + 1.5)
            colors.add(tuple(col))
        assert not (diff & ~near).any()
        assert _colors(o2["image"][diff]) <= colors
        np.testing.assert_array_equal(o1["proprio"], o2["proprio"])
        assert o1["instruction"] == o2["instruction"]
        a = plain.unwrapped.expert_action()
        o1, o2 = plain.step(a)[0], cl.step(a)[0]


@pytest.mark.parametrize("name", NAMES)
def test_actuator_bias(name):
    plain, o1, biased, o2 = _pair(name, "actuator_bias", seed=71)
    u = biased.unwrapped
    bias = np.asarray(type(u).actuator_bias, dtype=np.float32)
    assert bias.shape == (u.embodiment_spec.action_dim,) and np.abs(bias).max() > 0
    np.testing.assert_array_equal(u.bias, bias)
    np.testing.assert_array_equal(plain.unwrapped.bias, 0.0)
    moved_differently = False
    actions = [mid_action(plain), plain.unwrapped.expert_action(), *random_actions(plain, 3, seed=5)]
    for a in actions:
        o1, _, _, _, i1 = plain.step(a)
        o2, _, _, _, i2 = biased.step(a)
        np.testing.assert_array_equal(i1["executed_action"], a)
        np.testing.assert_allclose(i2["executed_action"], np.clip(a + bias, u._low, u._high), rtol=0, atol=1e-7)
        moved_differently |= not np.array_equal(o1["proprio"], o2["proprio"])
    assert moved_differently, "the same actions moved the biased robot exactly like the plain one"


@pytest.mark.parametrize("name", NAMES)
def test_expert_compensates_actuator_bias(name):
    plain, _, biased, _ = _pair(name, "actuator_bias", seed=81)
    u = biased.unwrapped
    want = plain.unwrapped._expert(plain.unwrapped._state)
    np.testing.assert_allclose(u.expert_action(), np.clip(want - u.bias, u._low, u._high), atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_shifts_compose(name):
    plain, o1, both, o2 = _pair(name, "lighting+actuator_bias", seed=91)
    u = both.unwrapped
    assert u.shifts == frozenset({"lighting", "actuator_bias"})
    for spelled in ("actuator_bias+lighting", ["lighting", "actuator_bias"], "lighting,actuator_bias"):
        other = make_env(name, shift=spelled)
        assert_tree_equal(other.reset(seed=91), both.reset(seed=91), f"shift spelled {spelled!r}")
    gain, tint = u.lighting
    np.testing.assert_array_equal(o2["image"], render.apply_lighting(o1["image"], gain, tint))
    a = mid_action(plain)
    _, _, _, _, info = both.step(a)
    np.testing.assert_allclose(info["executed_action"], np.clip(a + u.bias, u._low, u._high), atol=1e-7)
    assert np.abs(u.bias).max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_all_image_shifts_compose_in_order(name):
    """distractors, then lighting, then the camera offset: the image is offset(lighting(cluttered frame))."""
    _, plain_obs, _, cluttered = _pair(name, "distractors", seed=95)
    env = make_env(name, shift="distractors+lighting+camera_offset")
    obs = env.reset(seed=95)[0]
    gain, tint = env.unwrapped.lighting
    dx, dy = env.unwrapped.camera_shift
    expected = render.apply_offset(render.apply_lighting(cluttered["image"], gain, tint), dx, dy)
    np.testing.assert_array_equal(obs["image"], expected)
    np.testing.assert_array_equal(obs["proprio"], plain_obs["proprio"])
    assert obs["instruction"] == plain_obs["instruction"]
