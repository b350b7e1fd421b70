"""Judging a head rollout (no Ray, no torch): after a head v -> v+1 goes out, did the fleet do worse on
v+1 than on v? `judge_rollout` answers from the episodes of each; `RolloutWatch` is the learner's watch over
its rollouts, which rolls back on a yes. `fleet experiment adapt` replays the same judgement offline.

After a rollout v -> v+1 the watch compares the newest `reference_episodes` outcomes of v with the first
`watch_episodes` of v+1: a `fleet.monitor.Monitor` `success_drop` alarm (v+1's success more than
`success_drop` below v's) that a one-sided two-proportion z-test confirms at `significance` (so chance alone
rarely reverts a good head) re-publishes v's payload as v+2 (a rollback never reuses a number). Robots also
report how often the human stepped in during the episode: with a teleoperator rescuing every stray, a worse
head shows first as more interventions per episode, so a significant rise by more than `intervention_rise`
rolls back too.

The replicas have a say: a head some replica refused to install (HeadStore.rollout_state) is rolled back at
once, and a rollout without enough episodes is confirmed after `watch_timeout_s` only once every live replica
reports it installed (the clock starts then), never on silence. Every decision is durable before it acts:
the watched rollouts and a decided rollback are saved in the learner's state, and a rollback whose registry
call fails (or whose learner dies) is retried on every step, by the restarted learner too, until it is done.
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
    "previous", "published_at", "installed_at"}; `pending[name]` a decided rollback not yet done. Both live in
    `state` (saved on every change). While a rollout is watched or its rollback pending, that embodiment gets
    no new round, so every verdict compares exactly two versions.

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
        self.last_error: str | None = None

    @property
    def watching(self) -> dict[str, dict]:
        return self.state.watching

    @property
    def pending(self) -> dict[str, dict]:
        return self.state.pending_rollbacks

    def __contains__(self, name: str) -> bool:
        return name in self.watching or name in self.pending

    def start(self, name: str, version: int, previous: int) -> None:
        """Watch the rollout previous -> version of head `name`, published now."""
        with self.state.change():
            self.watching[name] = {"version": version, "previous": previous, "published_at": time.time()}

    def status(self) -> dict[str, dict]:
        """Each watched rollout with the episodes that ran on the new version and how many are needed, and
        each rollback decided but not yet done."""
        needed = self.config.watch_episodes
        out = {
            name: w | {"episodes": self.outcomes.count(name, w["version"]), "needed": needed}
            for name, w in list(self.watching.items())
        }
        return out | {name: p | {"rollback_pending": True} for name, p in list(self.pending.items())}

    def _installed(self, name: str, version: int) -> dict:
        """HeadStore.rollout_state of the registry; a registry without it (a bare store) counts as everywhere."""
        ask = getattr(self.registry, "rollout_state", None)
        if ask is None:
            return {"everywhere": True, "refused": []}
        return ask(name, version)

    def judge(self, name: str) -> dict | None:
        """Decide the watched rollout of `name` if enough episodes ran, or a replica refused it: confirm or
        roll back (the event), else None. A pending rollback is retried first."""
        if name in self.pending:
            return self._rollback(name)
        w = self.watching.get(name)
        if w is None:
            return None
        cfg = self.config
        installed = self._installed(name, w["version"])
        if installed["refused"]:
            why = "; ".join(f"{r['replica']}: {r['error']}" for r in installed["refused"][:3])
            return self._decide_rollback(name, w, {"episodes": 0}, f"replicas refused to install it ({why})")
        if installed["everywhere"] and w.get("installed_at") is None:
            w["installed_at"] = time.time()
            self.state.save()
        new = self.outcomes.episodes(name, w["version"])
        ref = self.outcomes.episodes(name, w["previous"])[-cfg.reference_episodes :]
        if len(new) < cfg.watch_episodes:
            since = w.get("installed_at")
            if since is not None and time.time() - since > cfg.watch_timeout_s:
                return self._confirmed(name, w, {"episodes": len(new)}, "timeout")
            return None
        new = new[: cfg.watch_episodes]
        if len(ref) < cfg.min_reference:
            return self._confirmed(name, w, {"episodes": len(new)}, "no reference episodes")
        rollback, info, reason = judge_rollout(ref, new, cfg, name)
        if rollback:
            return self._decide_rollback(name, w, info, reason)
        return self._confirmed(name, w, info, reason)

    def _confirmed(self, name: str, w: dict, info: dict, why: str) -> dict:
        with self.state.change():
            del self.watching[name]
            event = self.state.event("rollout_confirmed", name, version=w["version"], **info, why=why)
        return event

    def _decide_rollback(self, name: str, w: dict, info: dict, reason: str) -> dict | None:
        """Record the decision (durably) before acting on it, then act."""
        with self.state.change():
            del self.watching[name]
            self.pending[name] = {
                "rolled_back": w["version"],
                "restores": w["previous"],
                "reason": reason,
                "info": info,
                "version": None,
                "decided_at": time.time(),
                "attempts": 0,
            }
        return self._rollback(name)

    def _rollback(self, name: str) -> dict | None:
        """Do the pending rollback of `name`: the event, or None when the registry failed (retried next step)."""
        p = self.pending[name]
        p["attempts"] += 1
        try:
            _, payload = self.registry.get(name, p["restores"])
            if p["version"] is None:
                # the number is fixed before the call: a retry after a lost answer publishes the same version,
                # which the registry answers (same payload) instead of storing a second copy
                p["version"] = max(int(self.registry.latest().get(name, 0)), self.heads[name].version) + 1
                self.state.save()
            meta = {"rollback_of": p["rolled_back"], "restores": p["restores"], "reason": p["reason"]}
            version = int(self.registry.publish(name, p["version"], payload, meta))
        except ValueError as exc:  # the number was taken meanwhile (another publisher): pick a new one next time
            p["version"] = None
            return self._failed(name, p, exc)
        except Exception as exc:  # noqa: BLE001 - the registry is away or restarting: retried next step
            return self._failed(name, p, exc)
        with self.state.change():
            self.heads[name].install_payload(payload, version)
            del self.pending[name]
            self.state.rollbacks += 1
            event = self.state.event(
                "rollback",
                name,
                version=version,
                rolled_back=p["rolled_back"],
                restores=p["restores"],
                reason=p["reason"],
                attempts=p["attempts"],
                **p["info"],
            )
            self.last_error = None
        self.log(f"learner: {name} v{p['rolled_back']} rolled back as v{version}: {p['reason']}")
        return event

    def _failed(self, name: str, p: dict, exc: BaseException) -> None:
        self.last_error = f"rollback of {name} v{p['rolled_back']} failed, will retry: {type(exc).__name__}: {exc}"
        self.log(f"learner: {self.last_error}")
        self.state.save()
        return None
