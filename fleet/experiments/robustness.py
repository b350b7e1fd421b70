"""`fleet experiment robustness`: success of one checkpoint on every body x everyday shift, and how well
the out-of-distribution signals flag each shift from an episode's first observation (AUROC), and
the share of them above the confidence's novelty threshold (what the fleet would actually flag).

Success comes from `fleet.policy.evaluate.evaluate` (unseen scenes, the safety layer, chunk recycling),
so a cell here equals `fleet eval -e BODY --shift SHIFT --seed SEED --episodes N`. Detection scores the
first observation of the same episodes with and without the shift: the backbone-feature Mahalanobis
distance the fleet's ConfidenceEstimator uses (`feature_stats` in the checkpoint), and, where the
checkpoint or the caller supplies them, the raw-image statistics of `fleet.control.image_ood`. AUROC is
the chance that a shifted episode scores above an unshifted one (0.5: blind, 1.0: every shifted
episode flagged before any unshifted one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from fleet.control import FeatureStats
from fleet.control.confidence import ConfidenceConfig
from fleet.policy.evaluate import EVAL_SEED_BASE, evaluate
from fleet.sim import make_env

SHIFTS = ("none", "lighting", "camera_offset", "distractors")


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic / (n_p n_n))."""
    p, n = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if p.size == 0 or n.size == 0:
        raise ValueError(f"auroc: expected scores on both sides, got {p.size} positive and {n.size} negative")
    if not (np.isfinite(p).all() and np.isfinite(n).all()):
        raise ValueError("auroc: scores must be finite")
    greater = (p[:, None] > n[None, :]).sum()
    ties = (p[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (p.size * n.size))


def first_observations(body: str, shift: str | None, episodes: int, seed: int) -> list[dict]:
    """The reset observation of each of the `episodes` scenes `evaluate(..., seed=seed)` runs."""
    out = []
    for i in range(episodes):
        env = make_env(body, shift=None if shift in (None, "none") else shift)
        obs, _ = env.reset(seed=EVAL_SEED_BASE + seed * 100_003 + i)
        out.append(obs)
    return out


def feature_distances(model, stats: FeatureStats, body: str, observations: list[dict]) -> np.ndarray:
    """Backbone-feature distance (Mahalanobis / sqrt(F)) of each observation, as the fleet scores a reply."""
    import torch

    model.eval()
    with torch.inference_mode():
        rows = model.predict_obs(observations, [body] * len(observations))
    return np.array([stats.distance(r["features"]) for r in rows])


def run_robustness(
    model,
    meta: dict,
    bodies: Sequence[str],
    shifts: Sequence[str] = SHIFTS,
    episodes: int = 200,
    seed: int = 0,
    ood_episodes: int = 200,
    image_stats: dict | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Success per (body, shift) and per-shift detection AUROC; a JSON-able dict.

    meta: the checkpoint's metadata (`load_policy`); its extra.feature_stats score the feature distance.
    image_stats: {body: ImageStats} for the raw-image detector (default: the checkpoint's extra.image_stats
    when present)."""
    from fleet.control.image_ood import ImageStats
    from fleet.policy.train import chunk_policy

    t0 = time.perf_counter()
    policy = chunk_policy(model)
    success: dict[str, dict[str, dict]] = {}
    if episodes:
        for body in bodies:
            success[body] = {}
            for shift in shifts:
                r = evaluate(policy, body, episodes, shift=None if shift == "none" else shift, seed=seed)
                success[body][shift] = {"episodes": episodes, "success_rate": r.success_rate}
                log(f"{body} {shift}: {r.success_rate:.1%} of {episodes} ({time.perf_counter() - t0:.0f} s)")
    extra = meta.get("extra") or {}
    feats = {b: FeatureStats.from_dict(d) for b, d in (extra.get("feature_stats") or {}).items()}
    if image_stats is None:
        image_stats = {b: ImageStats.from_dict(d) for b, d in (extra.get("image_stats") or {}).items()}
    threshold = ConfidenceConfig().novelty_threshold
    detection: dict[str, dict[str, dict]] = {}
    flagged: dict[str, dict[str, dict]] = {}  # share of first observations above the novelty threshold
    if ood_episodes:
        for body in bodies:
            detection[body] = {}
            scores: dict[str, dict[str, np.ndarray]] = {}
            for shift in shifts:
                obs = first_observations(body, shift, ood_episodes, seed)
                s = {}
                if body in feats:
                    s["feature"] = feature_distances(model, feats[body], body, obs)
                if body in image_stats:
                    s["image"] = np.array([image_stats[body].distance(o["image"]) for o in obs])
                scores[shift] = s
                log(f"{body} {shift}: median distance " + ", ".join(f"{k} {np.median(v):.2f}" for k, v in s.items()))
            flagged[body] = {
                shift: {k: float((v > threshold).mean()) for k, v in s.items()} for shift, s in scores.items()
            }
            for shift in shifts:
                if shift == "none":
                    continue
                detection[body][shift] = {
                    k: auroc(scores[shift][k], scores["none"][k]) for k in scores[shift] if k in scores["none"]
                }
            log(f"{body} detection: {detection[body]}")
    return {
        "seed": seed,
        "seed_range": [EVAL_SEED_BASE + seed * 100_003, EVAL_SEED_BASE + seed * 100_003 + max(episodes, ood_episodes)],
        "episodes": episodes,
        "ood_episodes": ood_episodes,
        "success": success,
        "detection": detection,
        "novelty_threshold": threshold,
        "flagged": flagged,
        "seconds": time.perf_counter() - t0,
    }


def format_table(result: dict) -> str:
    """Success (body x shift) and AUROC (body x shift, feature / image) as fixed-width text."""
    lines = []
    success = result.get("success") or {}
    if success:
        shifts = list(next(iter(success.values())))
        lines.append(f"success, {result['episodes']} episodes per cell, eval seed block {result['seed']}")
        lines.append(f"{'body':<8}" + "".join(f"{s:>15}" for s in shifts))
        for body, row in success.items():
            lines.append(f"{body:<8}" + "".join(f"{row[s]['success_rate']:>15.1%}" for s in shifts))
    det = result.get("detection") or {}
    if det:
        shifts = list(next(iter(det.values())))
        lines.append(
            f"OOD AUROC from the first observation, {result['ood_episodes']} episodes per side (feature/image)"
        )
        lines.append(f"{'body':<8}" + "".join(f"{s:>15}" for s in shifts))
        for body, row in det.items():
            cells = []
            for s in shifts:
                f, i = row[s].get("feature"), row[s].get("image")
                cells.append("/".join("-" if v is None else f"{v:.2f}" for v in (f, i)))
            lines.append(f"{body:<8}" + "".join(f"{c:>15}" for c in cells))
    flags = result.get("flagged") or {}
    if flags:
        shifts = list(next(iter(flags.values())))
        lines.append(f"share flagged novel (distance > {result['novelty_threshold']:g}), feature/image")
        lines.append(f"{'body':<8}" + "".join(f"{s:>15}" for s in shifts))
        for body, row in flags.items():
            cells = [
                "/".join("-" if row[s].get(k) is None else f"{row[s][k]:.2f}" for k in ("feature", "image"))
                for s in shifts
            ]
            lines.append(f"{body:<8}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)
