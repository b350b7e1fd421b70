"""Judging a head rollout (no Ray, no torch): after a head v -> v+1 goes out, did the fleet do worse on
v+1 than on v? The learner (`fleet.learning.learner`) rolls back on a yes; `fleet experiment adapt` replays the
same judgement offline."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fleet.learning.learner import LearnerConfig


def judge_rollout(
    ref: list[tuple[bool, int | None]], new: list[tuple[bool, int | None]], cfg: LearnerConfig, name: str = "head"
) -> tuple[bool, dict, str]:
    """(roll back?, info, reason) for a rollout: `ref` are the previous version's episodes, `new` the new
    version's, each (success, interventions or None). Rolls back on a `fleet.monitor.Monitor` success-drop
    alarm that a one-sided two-proportion z-test confirms, or on a significant rise in interventions."""
    from fleet.monitor import Monitor, MonitorConfig

    monitor = Monitor(
        MonitorConfig(
            success_window=len(new),
            success_reference=len(ref),
            success_min_count=min(len(new), len(ref)),
            success_drop=cfg.success_drop,
        )
    )
    for ok, _ in ref + new:
        monitor.record_episode(f"{name}-fleet", name, ok)
    drop = [a for a in monitor.alarms() if a["kind"] == "success_drop" and a["scope"] == "embodiment"]
    rate_new, rate_ref = sum(ok for ok, _ in new) / len(new), sum(ok for ok, _ in ref) / len(ref)
    z_crit = NormalDist().inv_cdf(1.0 - cfg.significance)
    z = _drop_z(rate_ref, len(ref), rate_new, len(new))
    help_new, help_ref = [h for _, h in new if h is not None], [h for _, h in ref if h is not None]
    info = {"success": rate_new, "reference": rate_ref, "episodes": len(new)}
    if help_new and help_ref:
        info |= {"interventions": float(np.mean(help_new)), "reference_interventions": float(np.mean(help_ref))}
    if drop and z > z_crit:
        return True, info, f"{drop[0]['message']} (z={z:.2f})"
    rise = _rise(help_ref, help_new, cfg.intervention_rise, z_crit)
    if rise is not None:
        return True, info, rise
    return False, info, "success held" if not drop else f"drop not significant (z={z:.2f})"


def _rise(ref: list[int], new: list[int], rel: float, z_crit: float) -> str | None:
    """Why the interventions per episode rose enough to roll back (relative rise > `rel`, at least 0.5 more
    per episode, one-sided Welch z > `z_crit`), or None."""
    if len(ref) < 2 or len(new) < 2:
        return None
    m_ref, m_new = float(np.mean(ref)), float(np.mean(new))
    se = math.sqrt(np.var(ref, ddof=1) / len(ref) + np.var(new, ddof=1) / len(new))
    z = (m_new - m_ref) / se if se > 0 else (math.inf if m_new > m_ref else 0.0)
    if m_new - m_ref >= 0.5 and m_new > m_ref * (1.0 + rel) and z > z_crit:
        return f"interventions per episode rose {m_ref:.2f} -> {m_new:.2f} (z={z:.2f})"
    return None


def _drop_z(p_ref: float, n_ref: int, p_new: float, n_new: int) -> float:
    """z of a one-sided two-proportion test that the new success rate is below the reference's."""
    pooled = (p_ref * n_ref + p_new * n_new) / (n_ref + n_new)
    se = math.sqrt(max(pooled * (1.0 - pooled), 1e-12) * (1.0 / n_ref + 1.0 / n_new))
    return (p_ref - p_new) / se
