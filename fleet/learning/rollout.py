"""Judging a head rollout (no Ray, no torch): after a head v -> v+1 goes out, did the fleet do worse on
v+1 than on v? `judge_rollout` answers from the episodes of each; `RolloutWatch` is the learner's watch over
its rollouts, which rolls back on a yes. `fleet experiment adapt` replays the same judgement offline.

After a rollout v -> v+1 the watch compares the newest `reference_episodes` outcomes of v with the first
`watch_episodes` of v+1: a `fleet.monitor.Monitor` `success_drop` alarm (v+1's success more than
`success_drop` below v's) that a one-sided two-proportion z-test confirms at `significance` (so chance alone
rarely reverts a good head) re-publishes v's payload as v+2 (a rollback never reuses a number). Robots also
report how often the human stepped in during the episode: with a teleoperator rescuing every stray, a worse
head shows first as more interventions per episode, so a significant rise by more than `intervention_rise`
rolls back too. A rollout watched `watch_timeout_s` without enough episodes is confirmed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from fleet.learning.learner_state import LearnerState
from fleet.learning.outcomes import OutcomeLog
from fleet.learning.trained_head import TrainedHead
from fleet.monitor import Monitor, MonitorConfig

if TYPE_CHECKING:
    from fleet.learning.learner import LearnerConfig


def judge_rollout(
    ref: list[tuple[bool, int | None]], new: list[tuple[bool, int | None]], cfg: LearnerConfig, name: str = "head"
) -> tuple[bool, dict, str]:
    """(roll back?, info, reason) for a rollout: `ref` are the previous version's episodes, `new` the new
    version's, each (success, interventions or None). Rolls back on a `fleet.monitor.Monitor` success-drop
    alarm that a one-sided two-proportion z-test confirms, or on a significant rise in interventions."""
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


class RolloutWatch:
    """The learner's rollouts under watch, at most one per embodiment: `watching[name]` is {"version",
    "previous", "published_at"}. While a rollout is watched that embodiment gets no new round, so every
    verdict compares exactly two versions.

    A rollback re-publishes the previous version's payload to `registry` under a new number, installs it in
    `heads[name]` and counts it in `state` (saved)."""

    def __init__(
        self,
        config: LearnerConfig,
        outcomes: OutcomeLog,
        registry,
        heads: dict[str, TrainedHead],
        state: LearnerState,
        log: Callable[[str], None],
    ) -> None:
        self.config, self.outcomes, self.registry = config, outcomes, registry
        self.heads, self.state, self.log = heads, state, log
        self.watching: dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.watching

    def start(self, name: str, version: int, previous: int) -> None:
        """Watch the rollout previous -> version of head `name`, published now."""
        self.watching[name] = {"version": version, "previous": previous, "published_at": time.time()}

    def status(self) -> dict[str, dict]:
        """Each watched rollout with the episodes that ran on the new version and how many are needed."""
        needed = self.config.watch_episodes
        return {
            name: w | {"episodes": self.outcomes.count(name, w["version"]), "needed": needed}
            for name, w in list(self.watching.items())
        }

    def judge(self, name: str) -> dict | None:
        """Decide the watched rollout of `name` if enough episodes ran: confirm or roll back (the event), else
        None."""
        w = self.watching.get(name)
        if w is None:
            return None
        cfg = self.config
        new = self.outcomes.episodes(name, w["version"])
        ref = self.outcomes.episodes(name, w["previous"])[-cfg.reference_episodes :]
        if len(new) < cfg.watch_episodes:
            if time.time() - w["published_at"] > cfg.watch_timeout_s:
                del self.watching[name]
                return self._confirmed(name, w, {"episodes": len(new)}, "timeout")
            return None
        new = new[: cfg.watch_episodes]
        del self.watching[name]
        if len(ref) < cfg.min_reference:
            return self._confirmed(name, w, {"episodes": len(new)}, "no reference episodes")
        rollback, info, reason = judge_rollout(ref, new, cfg, name)
        if rollback:
            return self._rollback(name, w, info, reason)
        return self._confirmed(name, w, info, reason)

    def _confirmed(self, name: str, w: dict, info: dict, why: str) -> dict:
        return self.state.event("rollout_confirmed", name, version=w["version"], **info, why=why)

    def _rollback(self, name: str, w: dict, info: dict, message: str) -> dict:
        _, payload = self.registry.get(name, w["previous"])
        meta = {"rollback_of": w["version"], "restores": w["previous"], "reason": message}
        version = int(self.registry.publish(name, None, payload, meta))
        self.heads[name].install_payload(payload, version)
        self.state.rollbacks += 1
        event = self.state.event(
            "rollback", name, version=version, rolled_back=w["version"], restores=w["previous"], reason=message, **info
        )
        self.log(f"learner: {name} v{w['version']} rolled back as v{version}: {message}")
        self.state.save()
        return event
