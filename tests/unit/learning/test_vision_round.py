"""The vision round (fleet.learning.vision_round): a robot's corrections on frames the frozen encoder never saw
get an image adapter, checked on those corrections, instead of a head round. With the shipped checkpoint's
franka policy and its clean ImageStats, corrections from the scripted teleoperator; no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fleet.learning.vision_round as vr  # noqa: E402
from fleet.cluster.launcher import checkpoint_meta  # noqa: E402
from fleet.control.image_ood import ImageStats  # noqa: E402
from fleet.experiments.adapt import collect_corrections  # noqa: E402
from fleet.learning.vision_round import NOVELTY, correction_loss, frames_of, vision_round  # noqa: E402
from fleet.policy.default import load_policy  # noqa: E402
from fleet.policy.image_adapter import AdapterFit, ImageAdapter  # noqa: E402
from fleet.sim.base import FleetEnv  # noqa: E402

NAME = "franka"
LIGHT_GAIN, LIGHT_TINT = FleetEnv.lighting  # (0.55, (40, 25, -10))


def lighting_inverse() -> ImageAdapter:
    """The exact colour inverse of the simulator's `lighting` shift (up to its uint8 rounding)."""
    g = 1.0 / LIGHT_GAIN
    return ImageAdapter(gain=(g, g, g), bias=tuple(-t * g / 255.0 for t in LIGHT_TINT))


@pytest.fixture(scope="module")
def model():
    """The shipped checkpoint's policy, in eval mode as the servers run it."""
    m, _ = load_policy(None)
    return m.eval()


@pytest.fixture(scope="module")
def stats() -> ImageStats:
    """franka's clean ImageStats, as shipped in the checkpoint's metadata (extra.image_stats)."""
    return ImageStats.from_dict(checkpoint_meta(None)[1]["extra"]["image_stats"][NAME])


@pytest.fixture(scope="module")
def lit(model):
    """20 corrections made under the dimmer, warmer `lighting` shift."""
    corrections, _ = collect_corrections(model, NAME, "lighting", 20, seed=1)
    return corrections


@pytest.fixture(scope="module")
def clean(model):
    """12 corrections made on the clean rig (the operator corrected behaviour, not a view)."""
    corrections, _ = collect_corrections(model, NAME, None, 12, seed=1)
    return corrections


@pytest.fixture(scope="module")
def knocked(model):
    """12 corrections made with the camera knocked by (4, -3) pixels (`camera_offset`)."""
    corrections, _ = collect_corrections(model, NAME, "camera_offset", 12, seed=1)
    return corrections


@pytest.fixture(scope="module")
def lit_round(model, stats, lit):
    """The real round on the lighting corrections (the fit reads all 20 frames: ~3 s)."""
    return vision_round(model, NAME, lit, stats)


@pytest.fixture(scope="module")
def knocked_round(model, stats, knocked):
    """The real round on the knocked camera's corrections (12 frames: ~2 s)."""
    return vision_round(model, NAME, knocked, stats)


@pytest.fixture
def exact_fit(monkeypatch, stats):
    """Replace the round's fit by the exact inverse of the lighting shift, so the round's gates are tested apart
    from the quality of fit_image_adapter."""
    calls = []

    def fake_fit(images, s):
        calls.append(len(images))
        adapter = lighting_inverse()
        before = float(np.mean([s.distance(f) for f in images]))
        after = float(np.mean([s.distance(f) for f in adapter.apply(images)]))
        return AdapterFit(adapter, before, after, len(images), ((after, adapter),))

    monkeypatch.setattr(vr, "fit_image_adapter", fake_fit)
    return calls


def test_corrections_are_what_the_tests_assume(stats, lit, clean, knocked):
    """The fixtures hold: lighting and knocked-camera frames are far out of distribution, clean ones well inside."""
    assert len(lit) == 20 and len(clean) == 12 and len(knocked) == 12
    assert min(stats.distance(f) for f in frames_of(lit)) > 10 * NOVELTY
    assert min(stats.distance(f) for f in frames_of(knocked)) > 10 * NOVELTY
    assert max(stats.distance(f) for f in frames_of(clean)) < 1.0
    assert frames_of(lit).shape == (20, 64, 64, 3) and frames_of(lit).dtype == np.uint8


def test_lighting_round_publishes_a_brightening_adapter(lit_round):
    """20 lighting corrections are novel; the round fits and publishes a colour-only adapter with gains > 1.4
    (undoing the 0.55 dimming) that brings the frames far closer to the clean rig and lowers the corrections'
    loss by at least MIN_GAIN."""
    r = lit_round
    assert r.novel and r.frames == 20 and r.distance > 10 * NOVELTY
    assert r.published, r.reason
    assert r.adapter is not None and (r.adapter.dx, r.adapter.dy) == (0, 0)
    assert min(r.adapter.gain) > 1.4
    assert r.distance_after <= max(NOVELTY, vr.MAX_RESIDUAL * r.distance)
    assert r.distance_after < r.distance / 10
    assert r.loss_with < r.loss_without * (1.0 - vr.MIN_GAIN)
    assert "->" in r.reason and r.seconds > 0
    d = json.loads(json.dumps(r.to_dict()))  # plain JSON, the adapter as its dict
    assert d["adapter"] == r.adapter.to_dict() and d["published"] is True


def test_lighting_adapter_brings_the_frames_back_below_novelty(lit_round):
    """The fitted lighting adapter makes the corrections' frames read as the clean rig's (distance < NOVELTY)."""
    assert lit_round.distance_after < NOVELTY


def test_knocked_camera_round_publishes_the_offset(knocked_round):
    """12 corrections from a camera knocked by (4, -3): novel; the round publishes the (4, -3) adapter, which at
    least halves the image distance (the lost border strips keep some) and lowers the corrections' loss."""
    r = knocked_round
    assert r.novel and r.published, r.reason
    assert (r.adapter.dx, r.adapter.dy) == FleetEnv.camera_shift
    np.testing.assert_allclose(r.adapter.gain, 1.0, atol=0.1)
    assert r.distance_after <= vr.MAX_RESIDUAL * r.distance
    assert r.loss_with < r.loss_without * (1.0 - vr.MIN_GAIN)


def test_unshifted_corrections_are_the_heads_work(model, stats, clean, monkeypatch):
    """Corrections on clean frames: not novel, nothing fitted or published, the reason points to the head."""
    monkeypatch.setattr(vr, "fit_image_adapter", lambda *a, **k: pytest.fail("fitted an adapter to clean frames"))
    r = vision_round(model, NAME, clean, stats)
    assert not r.novel and not r.published
    assert r.adapter is None and r.loss_with is None and r.loss_without is None and r.distance_after is None
    assert r.distance < 1.0
    assert "head" in r.reason


def test_too_few_novel_corrections_wait(model, stats, lit, monkeypatch):
    """5 lighting corrections (< MIN_FRAMES) are novel but too few: nothing fitted, the round says to wait."""
    monkeypatch.setattr(vr, "fit_image_adapter", lambda *a, **k: pytest.fail("fitted on too few frames"))
    r = vision_round(model, NAME, lit[:5], stats)
    assert r.novel and not r.published and r.adapter is None
    assert r.frames == 5 and "wait" in r.reason


def test_published_path_with_an_exact_fit(model, stats, lit, exact_fit):
    """With a fit that undoes the lighting exactly, the round publishes: the adapted frames are in distribution
    and the corrections' loss falls by at least MIN_GAIN; the fit read every correction's frame."""
    r = vision_round(model, NAME, lit, stats)
    assert exact_fit == [20]
    assert r.published, r.reason
    assert r.adapter == lighting_inverse()
    assert r.distance_after < 1.5
    assert r.loss_with < r.loss_without * (1.0 - vr.MIN_GAIN)
    assert "->" in r.reason


def test_gate_refuses_an_adapter_that_does_not_lower_the_loss_enough(model, stats, lit, exact_fit):
    """min_gain=0.99 (the loss would have to fall 99%): the adapter is fitted and reported, not published, and
    the reason gives the losses."""
    r = vision_round(model, NAME, lit, stats, min_gain=0.99)
    assert r.novel and r.adapter is not None and r.distance_after < NOVELTY
    assert not r.published
    assert r.loss_with < r.loss_without  # better, only not 99% better
    assert "loss" in r.reason and "99%" in r.reason


def test_gate_refuses_an_adapter_that_explains_too_little(model, stats, lit, monkeypatch):
    """A fit that leaves the frames about as far out of distribution (61 -> 60) is not published, whatever the
    loss does, and the reason says so."""

    def useless_fit(images, s):
        weak = ImageAdapter(gain=(1.01, 1.0, 1.0))
        return AdapterFit(weak, 61.0, 60.0, len(images), ((60.0, weak),))

    monkeypatch.setattr(vr, "fit_image_adapter", useless_fit)
    r = vision_round(model, NAME, lit, stats, min_gain=-10.0)  # the loss gate alone would pass it
    assert r.novel and not r.published
    assert "too little" in r.reason and "60.00" in r.reason


def test_frames_through_the_current_adapter_are_in_distribution(model, stats, lit, monkeypatch):
    """The robot already serves the adapter that undoes its light: the frames as the policy sees them are in
    distribution, so the round is the head's work and fits nothing new."""
    monkeypatch.setattr(vr, "fit_image_adapter", lambda *a, **k: pytest.fail("refitted under a working adapter"))
    r = vision_round(model, NAME, lit, stats, current=lighting_inverse())
    assert not r.novel and not r.published and r.adapter is None
    assert r.distance < NOVELTY and "head" in r.reason


def test_the_published_adapter_as_current_makes_it_the_heads_work(model, stats, lit, lit_round):
    """With the round's own published adapter as the robot's current one, the same corrections are the head's
    work: nothing new is published and no loss is computed."""
    assert lit_round.published
    r = vision_round(model, NAME, lit, stats, current=lit_round.adapter)
    assert not r.novel and not r.published
    assert r.loss_with is None and r.loss_without is None
    assert "head" in r.reason


def test_few_corrections_through_the_robots_adapter_go_to_the_head(model, stats, knocked, knocked_round):
    """5 new corrections from the knocked robot that already serves its (4, -3) adapter: the camera is
    explained, so they are the head's work, not held back to wait for more."""
    assert knocked_round.published
    r = vision_round(model, NAME, knocked[:5], stats, current=knocked_round.adapter)
    assert not r.novel and "wait" not in r.reason


def test_current_adapter_is_the_loss_baseline(model, stats, lit, exact_fit):
    """loss_without is the corrections' loss through the robot's current adapter, not through none."""
    current = ImageAdapter(gain=(1.3, 1.3, 1.3))  # partly brightened: the frames still novel
    r = vision_round(model, NAME, lit, stats, current=current)
    assert r.novel
    assert r.loss_without == pytest.approx(correction_loss(model, NAME, lit, current))
    assert r.loss_without != pytest.approx(correction_loss(model, NAME, lit, None))


def test_no_corrections_is_an_error(model, stats):
    """An empty list is refused by name."""
    with pytest.raises(ValueError, match="no corrections"):
        vision_round(model, NAME, [], stats)


def test_correction_loss_is_deterministic_and_keeps_the_models_mode(model, lit):
    """Two calls give the same loss; the model leaves in the mode it came in (eval stays eval, train stays
    train); an adapter that undoes the light lowers the loss."""
    assert not model.training
    a = correction_loss(model, NAME, lit)
    b = correction_loss(model, NAME, lit)
    assert a == b and np.isfinite(a) and a > 0
    assert not model.training
    try:
        model.train()
        assert correction_loss(model, NAME, lit) == a  # eval-mode loss even when called on a training model
        assert model.training
    finally:
        model.eval()
    assert correction_loss(model, NAME, lit, lighting_inverse()) < a
    assert correction_loss(model, NAME, lit, ImageAdapter()) == a  # the identity is no adapter


def test_the_corrections_keep_the_statistics_proposal_unless_another_is_clearly_likelier():
    """_choose: a 1 % lower loss does not move the proposal (noise, measured under the dimmer light); a 20 %
    lower loss does, and among the near-best it takes the plain offset (colours untouched)."""
    proposed = ImageAdapter(dx=4, dy=-2, gain=(0.87, 0.88, 0.86))
    shifted = ImageAdapter(dx=4, dy=-3, gain=(0.87, 0.88, 0.86))
    plain = ImageAdapter(dx=4, dy=-3)
    assert vr._choose([(0.315, 0.4, proposed), (0.312, 6.6, shifted)], proposed) == (0.4, proposed)
    losses = [(0.1145, 13.3, proposed), (0.0944, 12.5, shifted), (0.0945, 13.2, plain)]
    assert vr._choose(losses, proposed) == (13.2, plain)
    assert vr._choose(losses[:2], proposed) == (12.5, shifted)
    # the proposed offset with colours the corrections do not ask for: the plain offset, when within tolerance
    assert vr._choose([(0.0944, 12.5, shifted), (0.0950, 13.2, plain)], shifted) == (13.2, plain)
    assert vr._choose([(0.0944, 12.5, shifted), (0.2, 13.2, plain)], shifted) == (12.5, shifted)
