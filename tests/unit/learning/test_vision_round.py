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
def lit_round(model, stats, lit):
    """The real round on the lighting corrections (the fit reads all 20 frames: ~3 s)."""
    return vision_round(model, NAME, lit, stats)


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
        return AdapterFit(adapter, before, after, len(images))

    monkeypatch.setattr(vr, "fit_image_adapter", fake_fit)
    return calls


def test_corrections_are_what_the_tests_assume(stats, lit, clean):
    """The fixtures hold: lighting frames are far out of distribution, clean ones well inside."""
    assert len(lit) == 20 and len(clean) == 12
    assert min(stats.distance(f) for f in frames_of(lit)) > 10 * NOVELTY
    assert max(stats.distance(f) for f in frames_of(clean)) < 1.0
    assert frames_of(lit).shape == (20, 64, 64, 3) and frames_of(lit).dtype == np.uint8


def test_lighting_round_fits_a_brightening_adapter_that_lowers_the_loss(lit_round):
    """Lighting corrections are novel; the round fits a colour-only adapter with gains > 1.4 (undoing the 0.55
    dimming) that brings the frames far closer to the clean rig and lowers the corrections' loss."""
    r = lit_round
    assert r.novel and r.frames == 20 and r.distance > 10 * NOVELTY
    assert r.adapter is not None and (r.adapter.dx, r.adapter.dy) == (0, 0)
    assert min(r.adapter.gain) > 1.4
    assert r.distance_after < r.distance / 10
    assert r.loss_with < r.loss_without * (1.0 - vr.MIN_GAIN)
    assert r.seconds > 0
    d = json.loads(json.dumps(r.to_dict()))  # plain JSON, the adapter as its dict
    assert d["adapter"] == r.adapter.to_dict() and d["novel"] is True


@pytest.mark.xfail(
    strict=True,
    reason="BUG fleet/policy/image_adapter.py fit_image_adapter: the moment-matched gain (~1.73, 1/0.55 = 1.82) "
    "carries the corrections' scene content, a few objects' colours land in another histogram cell, and the "
    "adapted frames' distance is 3.03 > NOVELTY: the round refuses 'adapted frames still novel' although the "
    "corrections' loss falls 26% (0.564 -> 0.418). The exact inverse gives ~0.6",
)
def test_lighting_round_publishes(lit_round):
    """The real round on 20 lighting corrections publishes its adapter: in distribution again and a lower loss."""
    assert lit_round.distance_after < NOVELTY
    assert lit_round.published, lit_round.reason


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


def test_gate_refuses_an_adapter_that_leaves_the_frames_novel(model, stats, lit, monkeypatch):
    """A fit whose adapted frames are still out of distribution is not published, whatever the loss does."""

    def useless_fit(images, s):
        return AdapterFit(ImageAdapter(gain=(1.01, 1.0, 1.0)), 61.0, 60.0, len(images))

    monkeypatch.setattr(vr, "fit_image_adapter", useless_fit)
    r = vision_round(model, NAME, lit, stats, min_gain=-10.0)  # the loss gate alone would pass it
    assert not r.published and "still novel" in r.reason


def test_frames_through_the_current_adapter_are_in_distribution(model, stats, lit, monkeypatch):
    """The robot already serves the adapter that undoes its light: the frames as the policy sees them are in
    distribution, so the round is the head's work and fits nothing new."""
    monkeypatch.setattr(vr, "fit_image_adapter", lambda *a, **k: pytest.fail("refitted under a working adapter"))
    r = vision_round(model, NAME, lit, stats, current=lighting_inverse())
    assert not r.novel and not r.published and r.adapter is None
    assert r.distance < NOVELTY and "head" in r.reason


@pytest.mark.xfail(
    strict=True,
    reason="BUG fleet/policy/image_adapter.py fit_image_adapter (see test_lighting_round_publishes): the fitted "
    "adapter leaves the median frame at distance ~3.5 > NOVELTY, so with it as `current` the next round calls the "
    "same corrections novel again and refits",
)
def test_frames_through_the_fitted_adapter_are_in_distribution(model, stats, lit, lit_round, exact_fit):
    """With the round's own adapter as the robot's current one, the same corrections are no longer novel."""
    r = vision_round(model, NAME, lit, stats, current=lit_round.adapter)
    assert not r.novel and "head" in r.reason


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
