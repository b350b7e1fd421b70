"""How sure the policy is, read from ONE reply: flow-sample spread, token entropy, feature novelty.

The estimator never calls a model. A reply with no uncertainty signal (a single deterministic chunk, one
flow sample, features without statistics) is reported as unknown and fails closed: `known=False`, value 0.0,
reason "no uncertainty signal", so anything gating on the value (DegradationPolicy) treats it as low and asks
a human, instead of trusting a policy that gave no grounds to. Robots ask flow heads for several samples
and token heads return entropies, so their replies always carry a signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fleet.validate import check_int, fail, is_number


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """In-distribution backbone features: mean (F,) and precision (F, F) (inverse covariance)."""

    mean: np.ndarray  # (F,) float64 feature mean of the training data
    precision: np.ndarray  # (F, F) float64 inverse of the (shrunk) covariance

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, np.float64)
        prec = np.asarray(self.precision, np.float64)
        if mean.ndim != 1 or mean.size == 0 or not np.isfinite(mean).all():
            raise ValueError(f"FeatureStats.mean: expected a finite (F,) vector, got shape {mean.shape}")
        if prec.shape != (mean.size, mean.size) or not np.isfinite(prec).all():
            raise ValueError(
                f"FeatureStats.precision: expected finite shape {(mean.size, mean.size)}, got {prec.shape}"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "precision", prec)

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    @classmethod
    def from_cov(cls, mean: np.ndarray, cov: np.ndarray) -> FeatureStats:
        """From mean (F,) and covariance (F, F); the covariance must be invertible."""
        try:
            return cls(mean, np.linalg.inv(np.asarray(cov, np.float64)))
        except np.linalg.LinAlgError:
            raise ValueError("FeatureStats cov: expected an invertible (F, F) covariance; fit with shrinkage") from None

    @classmethod
    def fit(cls, features: np.ndarray, shrinkage: float = 0.1) -> FeatureStats:
        """Fit on features (N, F), N >= 2. The covariance is shrunk towards its mean variance times I,
        which keeps it invertible when N < F and steadies the distance on few samples."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
            raise ValueError(f"features: expected finite shape (N>=2, F), got {x.shape}")
        if not 0 <= shrinkage <= 1 or (shrinkage == 0 and x.shape[0] <= x.shape[1]):
            raise ValueError(f"shrinkage: expected a number in [0, 1] (> 0 when N <= F), got {shrinkage!r}")
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        target = max(float(np.trace(cov)) / x.shape[1], 1e-12) * np.eye(x.shape[1])
        return cls.from_cov(x.mean(axis=0), (1 - shrinkage) * cov + shrinkage * target)

    def distance(self, feature: np.ndarray) -> float:
        """Mahalanobis distance of feature (F,) divided by sqrt(F): about 1 for in-distribution features."""
        f = np.asarray(feature, np.float64)
        if f.shape != self.mean.shape:
            raise ValueError(f"features: expected shape {self.mean.shape} (FeatureStats), got {f.shape}")
        d = f - self.mean
        return math.sqrt(max(float(d @ self.precision @ d), 0.0) / self.dim)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureStats:
        if not isinstance(d, dict) or "mean" not in d or "precision" not in d:
            raise ValueError("FeatureStats.from_dict: expected a dict with 'mean' and 'precision'")
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["precision"], np.float64))


@dataclass(frozen=True)
class ConfidenceConfig:
    """Thresholds per signal. Each component confidence is 1 / (1 + (x / threshold) ** sharpness): exactly 0.5 at
    its threshold, so one confidence threshold downstream (0.5) lines up with every component's."""

    disagreement_threshold: float = 0.2
    # mean per-dim std across flow samples, in normalized action units, at which the flow component is 0.5
    entropy_threshold: float = 0.5
    # mean token entropy (fraction of log(n_bins) when n_bins is known, else nats) at which it is 0.5
    ood_threshold: float = 2.0
    # feature distance (Mahalanobis / sqrt(F), ~1 in distribution) at which the ood component is 0.5
    novelty_threshold: float = 3.0
    # feature distance (or camera image distance) above which the scene counts as novel (Confidence.is_novel)
    sharpness: float = 4.0
    # steepness of the mapping around each threshold
    n_bins: int | None = None
    # token bins per dimension when replies do not say (reply["n_bins"] wins)

    def __post_init__(self) -> None:
        for name in ("disagreement_threshold", "entropy_threshold", "ood_threshold", "novelty_threshold", "sharpness"):
            v = getattr(self, name)
            if not (is_number(v) and math.isfinite(v) and v > 0):
                fail(f"ConfidenceConfig.{name}", "a positive finite number", v)
        if self.n_bins is not None:
            check_int("ConfidenceConfig.n_bins", self.n_bins, lo=2, expected="None or an int >= 2")


@dataclass(frozen=True)
class Confidence:
    """One reply's confidence: value in [0, 1] is the weakest component."""

    value: float  # min over components; 0.0 when unknown (fail closed)
    reasons: list[str]  # why it is low (or "no uncertainty signal")
    components: dict[str, float] = field(default_factory=dict)  # raw signals and per-component confidences
    known: bool = True  # False when the reply carried no uncertainty signal at all
    is_novel: bool = False  # feature (or camera image) distance above the novelty threshold

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "reasons": list(self.reasons),
            # NaN/Inf are not JSON: a non-finite raw signal is written as null
            "components": {k: (v if math.isfinite(v) else None) for k, v in self.components.items()},
            "known": self.known,
            "is_novel": self.is_novel,
        }


class ConfidenceEstimator:
    """Scores one policy reply (a dict) from whichever of these keys it carries:
    samples (K, T, D) flow samples (K >= 2 gives a disagreement), entropy (T, D) token entropies in nats,
    n_bins (int) bins per dimension, features (F,) backbone feature (scored only when `feature_stats` is given).
    """

    def __init__(
        self, config: ConfidenceConfig | None = None, feature_stats: FeatureStats | None = None, image_stats=None
    ) -> None:
        self.config = ConfidenceConfig() if config is None else config
        self.feature_stats = feature_stats
        self.image_stats = image_stats  # fleet.control.image_ood.ImageStats: novelty from the raw camera image

    def _level(self, x: float, threshold: float) -> float:
        return 1.0 / (1.0 + (x / threshold) ** self.config.sharpness)

    def estimate(self, reply: dict, image: np.ndarray | None = None) -> Confidence:
        """Confidence of one reply. Malformed arrays raise ValueError; non-finite ones give confidence 0.

        image: the camera frame the reply answers (through the reply's `image_adapter` when the server applied
        the robot's, so a camera the learner mapped back onto the rig is no longer novel); with `image_stats` its
        distance from the training frames
        (component `image_distance`) marks the scene novel above novelty_threshold, as the feature distance
        does. It is a novelty signal only: a new light or camera pose slows the robot (degradation), it does not
        by itself say the chunk is wrong."""
        if not isinstance(reply, dict):
            raise ValueError(f"reply: expected a dict, got {type(reply).__name__}")
        cfg, comps, reasons, levels = self.config, {}, [], []

        def score(name: str, raw: float, threshold: float, label: str) -> None:
            level = self._level(raw, threshold) if math.isfinite(raw) else 0.0
            comps[name], comps[f"{name}_confidence"] = raw, level
            levels.append(level)
            if not raw <= threshold:
                reasons.append(f"{label} {raw:.2f} > {threshold:g}")

        samples = reply.get("samples")
        if samples is not None:
            s = np.asarray(samples, np.float64)
            if s.ndim != 3 or 0 in s.shape:
                raise ValueError(f"samples: expected shape (K, T, D), got {s.shape}")
            if s.shape[0] >= 2:
                score(
                    "disagreement",
                    float(np.std(s, axis=0, ddof=1).mean()),
                    cfg.disagreement_threshold,
                    "flow disagreement",
                )
            else:
                reasons.append("1 flow sample: no disagreement signal")
        entropy = reply.get("entropy")
        if entropy is not None:
            h = np.asarray(entropy, np.float64)
            if h.ndim != 2 or h.size == 0:
                raise ValueError(f"entropy: expected shape (T, D) of per-dim entropies in nats, got {h.shape}")
            n_bins = reply.get("n_bins", cfg.n_bins)
            if n_bins is not None:  # a numpy int is an int here (np.bool_ is not one)
                check_int("n_bins", int(n_bins) if isinstance(n_bins, np.integer) else n_bins, lo=2)
            scale = math.log(n_bins) if n_bins else 1.0
            score("entropy", float(h.mean()) / scale, cfg.entropy_threshold, "token entropy")
        features = reply.get("features")
        if features is not None and self.feature_stats is not None:
            score("ood_distance", self.feature_stats.distance(features), cfg.ood_threshold, "ood distance")
        if image is not None and self.image_stats is not None:
            try:
                adapter = reply.get("image_adapter")
                if adapter:  # the server read the frame through this robot's image adapter: score what it read
                    from fleet.policy.image_adapter import ImageAdapter  # numpy only

                    image = ImageAdapter.from_dict(adapter).apply(np.asarray(image))
                comps["image_distance"] = self.image_stats.distance(image)
            except ValueError as exc:  # a camera unlike the one the statistics know: no image signal, say why
                reasons.append(f"camera image not scored: {exc}")
        if not levels:  # fail closed: no grounds for confidence is not confidence
            return Confidence(0.0, reasons + ["no uncertainty signal"], comps, known=False)
        novel = False
        for key, label in (("ood_distance", "ood distance"), ("image_distance", "camera image distance")):
            if not comps.get(key, 0.0) <= cfg.novelty_threshold:
                novel = True
                reasons.append(f"novel scene: {label} {comps[key]:.2f} > {cfg.novelty_threshold:g}")
        return Confidence(float(min(levels)), reasons, comps, known=True, is_novel=novel)
