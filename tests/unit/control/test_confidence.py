"""ConfidenceEstimator: scores one reply from samples, entropy or features; never 'confident' by default."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fleet.control import Confidence, ConfidenceConfig, ConfidenceEstimator, FeatureStats


@pytest.fixture(scope="module")
def stats() -> FeatureStats:
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.5, 2.0, 8))
    return FeatureStats.fit(rng.multivariate_normal(np.arange(8.0), cov, size=4000), shrinkage=0.05)


def samples_with_std(std: float, k: int = 8, t: int = 16, d: int = 7) -> np.ndarray:
    """(K, T, D) samples whose per-entry sample std (ddof=1) is exactly `std`."""
    z = np.random.default_rng(1).normal(size=(k, t, d))
    z = (z - z.mean(axis=0)) / z.std(axis=0, ddof=1)
    return 0.3 + std * z


@pytest.mark.parametrize("reply", [{}, {"chunk": np.zeros((16, 7))}, {"samples": np.zeros((1, 16, 7))}])
def test_no_uncertainty_signal_is_unknown_not_confident(reply):
    conf = ConfidenceEstimator().estimate(reply)
    # fails closed: before, an unknown scored 1.0 and a policy gating on the value trusted it
    assert conf.known is False and conf.value == 0.0 and "no uncertainty signal" in conf.reasons
    assert not conf.is_novel


def test_features_without_stats_are_not_a_signal():
    conf = ConfidenceEstimator().estimate({"features": np.zeros(8)})
    assert conf.known is False


def test_flow_disagreement_maps_to_half_at_the_threshold():
    est = ConfidenceEstimator(ConfidenceConfig(disagreement_threshold=0.2))
    agree = est.estimate({"samples": samples_with_std(0.0)})
    assert agree.known and agree.value == 1.0 and agree.reasons == []
    at = est.estimate({"samples": samples_with_std(0.2)})
    assert at.components["disagreement"] == pytest.approx(0.2) and at.value == pytest.approx(0.5)
    high = est.estimate({"samples": samples_with_std(0.31)})
    assert high.value < 0.5 and high.reasons == ["flow disagreement 0.31 > 0.2"]
    low = est.estimate({"samples": samples_with_std(0.1)})
    assert low.value > 0.9 and low.reasons == []


def test_entropy_is_normalized_by_log_bins():
    est = ConfidenceEstimator(ConfidenceConfig(entropy_threshold=0.5))
    uniform = np.full((16, 7), math.log(256))  # the most uncertain a 256-bin head can be
    conf = est.estimate({"entropy": uniform, "n_bins": 256})
    assert conf.components["entropy"] == pytest.approx(1.0) and conf.value == pytest.approx(1 / 17)
    assert conf.reasons == ["token entropy 1.00 > 0.5"]
    peaked = est.estimate({"entropy": np.full((16, 7), 0.1 * math.log(256)), "n_bins": 256})
    assert peaked.value > 0.99
    nats = est.estimate({"entropy": np.full((16, 7), 0.25)})  # no n_bins: raw nats
    assert nats.components["entropy"] == pytest.approx(0.25)


def test_ood_distance_and_novelty(stats):
    est = ConfidenceEstimator(ConfidenceConfig(ood_threshold=2.0, novelty_threshold=3.0), feature_stats=stats)
    rng = np.random.default_rng(2)
    typical = [est.estimate({"features": np.arange(8.0) + rng.normal(size=8)}) for _ in range(50)]
    assert np.median([c.components["ood_distance"] for c in typical]) == pytest.approx(1.0, abs=0.3)
    assert not any(c.is_novel for c in typical)
    far = est.estimate({"features": np.arange(8.0) + 10.0})
    assert far.is_novel and far.value < 0.1
    assert any(r.startswith("ood distance") for r in far.reasons) and any("novel" in r for r in far.reasons)


def test_value_is_the_weakest_component(stats):
    est = ConfidenceEstimator(feature_stats=stats)
    reply = {"samples": samples_with_std(0.25), "entropy": np.full((16, 7), 0.1), "features": np.arange(8.0)}
    conf = est.estimate(reply)
    parts = [v for k, v in conf.components.items() if k.endswith("_confidence")]
    assert len(parts) == 3 and conf.value == min(parts) == conf.components["disagreement_confidence"]


def test_non_finite_signal_gives_zero_confidence():
    samples = samples_with_std(0.1)
    samples[0, 0, 0] = np.nan
    conf = ConfidenceEstimator().estimate({"samples": samples})
    assert conf.value == 0.0 and conf.reasons


def test_feature_stats_json_round_trip(stats):
    again = FeatureStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    x = np.arange(8.0) + 1.5
    assert again.distance(x) == pytest.approx(stats.distance(x), rel=1e-12)


def test_fit_with_fewer_samples_than_features_needs_shrinkage():
    x = np.random.default_rng(3).normal(size=(5, 10))
    with pytest.raises(ValueError, match="shrinkage"):
        FeatureStats.fit(x, shrinkage=0.0)
    assert math.isfinite(FeatureStats.fit(x, shrinkage=0.2).distance(np.zeros(10)))
    with pytest.raises(ValueError, match="invertible"):
        FeatureStats.from_cov(np.zeros(2), np.ones((2, 2)))


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ({"samples": np.zeros((4, 7))}, r"samples: expected shape \(K, T, D\)"),
        ({"entropy": np.zeros(7)}, r"entropy: expected shape \(T, D\)"),
        ({"entropy": np.zeros((2, 7)), "n_bins": 1}, "n_bins"),
        ({"features": np.zeros(3)}, r"features: expected shape \(8,\)"),
        ("not a dict", "reply"),
    ],
)
def test_malformed_reply_raises(stats, reply, match):
    with pytest.raises(ValueError, match=match):
        ConfidenceEstimator(feature_stats=stats).estimate(reply)


@pytest.mark.parametrize("field", ["disagreement_threshold", "entropy_threshold", "ood_threshold", "sharpness"])
def test_config_validation_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        ConfidenceConfig(**{field: 0.0})


def test_confidence_to_dict_is_json():
    conf = ConfidenceEstimator().estimate({"samples": samples_with_std(0.5)})
    d = json.loads(json.dumps(conf.to_dict()))
    assert d["known"] is True and d["value"] == pytest.approx(conf.value) and isinstance(conf, Confidence)


def test_a_reply_without_uncertainty_pauses_the_default_degradation_policy():
    from fleet.control.degradation import DegradationPolicy, State

    policy = DegradationPolicy()
    assert policy.update(ConfidenceEstimator().estimate({"chunk": np.zeros((16, 7))})) is State.PAUSED
