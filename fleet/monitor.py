"""Fleet monitoring: success rate over time, action-distribution drift, latency percentiles, and their alarms.

numpy only, fed by robot actors; `snapshot()` is plain JSON for the CLI and metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fleet.validate import check_int, fail, is_number

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    """Window sizes and alarm thresholds."""

    success_window: int = 50
    # recent episodes per robot / embodiment / fleet whose success rate is compared
    success_reference: int = 100
    # episodes just before those: the reference the recent rate must not fall below
    success_drop: float = 0.15
    # alarm when reference rate - recent rate exceeds this
    success_min_count: int = 20
    # both windows need at least this many episodes before the success alarm may fire
    drift_window: int = 200
    # recent actions per embodiment tested for a mean shift; 200 against 800 puts a full 0.5-sigma shift at
    # |z| ~ 6, far above the Bonferroni threshold (~4.1 for 24 dims), so it is flagged within 200 samples
    drift_reference: int = 800
    # actions just before those: the reference distribution
    drift_check_every: int = 10
    # actions between two drift tests (tests on overlapping windows are correlated; this bounds the cost)
    drift_alpha: float = 0.001
    # false-alarm probability of one drift test, Bonferroni-split over the action dimensions
    latency_budget_ms: float = 100.0
    # the policy round-trip budget
    latency_percentile: float = 95.0
    # alarm when this percentile of the recent latencies exceeds the budget
    latency_window: int = 1000
    # recent latencies kept per robot (and for the fleet)
    latency_min_count: int = 20
    # latencies needed before the latency alarm may fire
    history: int = 200
    # success-history points per key and alarm onsets kept in memory

    def __post_init__(self) -> None:
        for name in ("drift_window", "drift_reference"):  # a variance needs two samples
            self._check_int(name, 2)
        for name in ("success_window", "success_reference", "success_min_count", "drift_check_every"):
            self._check_int(name, 1)
        for name in ("latency_window", "latency_min_count", "history"):
            self._check_int(name, 1)
        for name, lo, hi in (("success_drop", 0, 1), ("drift_alpha", 0, 1), ("latency_percentile", 0, 100)):
            v = getattr(self, name)
            if not (is_number(v) and lo < v < hi):
                fail(f"MonitorConfig.{name}", f"a number in ({lo}, {hi})", v)
        b = self.latency_budget_ms
        if not (is_number(b) and math.isfinite(b) and b > 0):
            fail("MonitorConfig.latency_budget_ms", "a positive number", b)

    def _check_int(self, name: str, least: int) -> None:
        check_int(f"MonitorConfig.{name}", getattr(self, name), lo=least)


class DriftDetector:
    """Mean-shift test between the newest `window` samples and the `reference` samples before them.

    Per dimension z_j = (mean_recent - mean_ref) / sqrt(var_ref / R + var_recent / W); a test alarms when
    max_j |z_j| exceeds the two-sided normal quantile at alpha / D (Bonferroni), so one test on stationary data
    alarms with probability <= alpha whatever the correlation between dimensions.
    """

    def __init__(self, dim: int, window: int = 200, reference: int = 800, check_every: int = 10, alpha: float = 1e-3):
        self.dim, self.window, self.reference, self.check_every = dim, window, reference, check_every
        self.z_crit = NormalDist().inv_cdf(1.0 - alpha / (2 * dim))
        self._ring = np.zeros((window + reference, dim))
        self.n = self.checks = self.alarms = 0
        self.alarm = False  # the latest test's verdict
        self.z_max, self.z_dim = 0.0, -1  # the latest test's largest |z| and its dimension

    def add(self, x: np.ndarray) -> bool:
        """Add one sample (D,); returns True when this sample completed a test that alarmed."""
        cap = self._ring.shape[0]
        self._ring[self.n % cap] = x
        self.n += 1
        if self.n < cap or (self.n - cap) % self.check_every:
            return False
        ordered = np.roll(self._ring, -(self.n % cap), axis=0)  # oldest first
        ref, rec = ordered[: self.reference], ordered[self.reference :]
        diff = rec.mean(axis=0) - ref.mean(axis=0)
        se = np.sqrt(ref.var(axis=0, ddof=1) / self.reference + rec.var(axis=0, ddof=1) / self.window)
        # constant data on both sides: any difference at all is a shift
        z = np.abs(np.divide(diff, se, out=np.where(diff == 0, 0.0, np.inf), where=se > 0))
        self.z_dim = int(np.argmax(z))
        self.z_max, self.alarm = float(z[self.z_dim]), bool(z[self.z_dim] > self.z_crit)
        self.checks += 1
        self.alarms += int(self.alarm)
        return self.alarm

    def to_dict(self) -> dict:
        z = self.z_max if math.isfinite(self.z_max) else None
        state = {"samples": self.n, "checks": self.checks, "alarms": self.alarms, "alarm": self.alarm}
        return state | {"z_max": z, "z_dim": self.z_dim, "z_crit": self.z_crit}


def _rate(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


class Monitor:
    """Collects outcomes, actions and latencies from the whole fleet and raises alarms on them."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = cfg = MonitorConfig() if config is None else config
        self._outcomes: dict[tuple[str, str], deque[bool]] = {}  # (scope, key) -> recent + reference episodes
        self._totals: dict[tuple[str, str], list[int]] = {}  # (scope, key) -> [episodes, successes]
        self._history: dict[tuple[str, str], deque[dict]] = {}  # (scope, key) -> windowed rate points
        self._drift: dict[str, DriftDetector] = {}
        self._latency: dict[str, deque[float]] = {"": deque(maxlen=cfg.latency_window)}  # "" = the fleet
        self._active: dict[tuple[str, str, str], dict] = {}  # (kind, scope, key) -> alarm
        self.alarm_log: deque[dict] = deque(maxlen=cfg.history)

    def _set_alarm(self, kind: str, scope: str, key: str, alarm: dict | None) -> None:
        ident = (kind, scope, key)
        if alarm is None:
            self._active.pop(ident, None)
            return
        alarm = {"kind": kind, "scope": scope, "key": key} | alarm
        if ident not in self._active:
            self.alarm_log.append(alarm | {"t": time.time()})
            log.warning("monitor alarm: %s", alarm["message"])
        self._active[ident] = alarm

    def record_episode(self, robot_id: str, embodiment: str, success: bool, t: float | None = None) -> None:
        """One finished episode of `robot_id` (an `embodiment`); t = its end time in seconds (default now)."""
        if not isinstance(success, (bool, np.bool_)):
            raise ValueError(f"success: expected a bool, got {success!r}")
        cfg, t = self.config, time.time() if t is None else float(t)
        for scope, key in (("robot", str(robot_id)), ("embodiment", str(embodiment)), ("fleet", "fleet")):
            ident = (scope, key)
            window = self._outcomes.setdefault(ident, deque(maxlen=cfg.success_window + cfg.success_reference))
            window.append(bool(success))
            totals = self._totals.setdefault(ident, [0, 0])
            totals[0] += 1
            totals[1] += int(success)
            recent = list(window)[-cfg.success_window :]
            if totals[0] % cfg.success_window == 0:  # one point per window: the rate over time
                hist = self._history.setdefault(ident, deque(maxlen=cfg.history))
                hist.append({"episodes": totals[0], "t": t, "rate": _rate(recent)})
            reference = list(window)[: -cfg.success_window]
            alarm = None
            if min(len(recent), len(reference)) >= cfg.success_min_count:
                now, before = _rate(recent), _rate(reference)
                drop = before - now
                if drop > cfg.success_drop:
                    msg = f"{scope} {key}: success {now:.2f} is {drop:.2f} below reference {before:.2f}"
                    alarm = {"value": drop, "threshold": cfg.success_drop, "message": msg}
            self._set_alarm("success_drop", scope, key, alarm)

    def record_action(self, embodiment: str, action: np.ndarray) -> bool:
        """One sent action (D,) of `embodiment`; True when it completed a drift test that alarmed."""
        a = np.asarray(action, np.float64)
        det = self._drift.get(embodiment)
        want = det.dim if det is not None else None
        if a.ndim != 1 or a.size == 0 or (want is not None and a.size != want) or not np.isfinite(a).all():
            raise ValueError(f"action: expected finite shape ({want or 'D'},) for {embodiment!r}, got {a.shape}")
        if det is None:
            cfg = self.config
            det = DriftDetector(a.size, cfg.drift_window, cfg.drift_reference, cfg.drift_check_every, cfg.drift_alpha)
            self._drift[embodiment] = det
        before = det.checks
        alarmed = det.add(a)
        if det.checks != before:
            msg = (
                f"embodiment {embodiment}: action mean shift |z|={det.z_max:.1f} > {det.z_crit:.1f} in dim {det.z_dim}"
            )
            alarm = {"value": det.z_max, "threshold": det.z_crit, "message": msg} if alarmed else None
            self._set_alarm("action_drift", "embodiment", embodiment, alarm)
        return alarmed

    def record_latency(self, robot_id: str, ms: float) -> None:
        """One policy round trip of `robot_id`, in milliseconds."""
        if not ((is_number(ms) or isinstance(ms, np.number)) and math.isfinite(ms) and ms >= 0):
            fail("ms", "a non-negative finite latency in milliseconds", ms)
        cfg = self.config
        for scope, key in (("robot", str(robot_id)), ("fleet", "")):
            samples = self._latency.setdefault(key, deque(maxlen=cfg.latency_window))
            samples.append(float(ms))
            alarm = None
            if len(samples) >= cfg.latency_min_count:
                p = float(np.percentile(samples, cfg.latency_percentile))
                if p > cfg.latency_budget_ms:
                    name = f"robot {key}" if key else "fleet"
                    msg = (
                        f"{name}: p{cfg.latency_percentile:g} latency {p:.1f} ms > budget {cfg.latency_budget_ms:g} ms"
                    )
                    alarm = {"value": p, "threshold": cfg.latency_budget_ms, "message": msg}
            self._set_alarm("latency", scope, key or "fleet", alarm)

    def success_rate(self, robot_id: str | None = None, embodiment: str | None = None) -> float | None:
        """Recent-window success rate of one robot, one embodiment, or (neither given) the fleet; None if no data."""
        ident = ("fleet", "fleet")
        if robot_id is not None or embodiment is not None:
            ident = ("robot", str(robot_id)) if robot_id is not None else ("embodiment", str(embodiment))
        window = self._outcomes.get(ident)
        return _rate(list(window)[-self.config.success_window :]) if window else None

    def latency(self, robot_id: str | None = None) -> dict:
        """p50/p95/p99 (ms) and count over the recent latencies of one robot, or the fleet."""
        samples = self._latency.get("" if robot_id is None else str(robot_id))
        if not samples:
            return {"count": 0, "p50": None, "p95": None, "p99": None}
        p50, p95, p99 = (float(v) for v in np.percentile(samples, [50, 95, 99]))
        return {"count": len(samples), "p50": p50, "p95": p95, "p99": p99}

    def alarms(self) -> list[dict]:
        """Alarms active now: kind (success_drop | action_drift | latency), scope, key, value, threshold, message."""
        return [dict(a) for a in self._active.values()]

    def snapshot(self) -> dict:
        """Everything above as plain JSON-able values."""
        success: dict = {"robot": {}, "embodiment": {}, "fleet": {}}
        for (scope, key), window in self._outcomes.items():
            episodes, wins = self._totals[(scope, key)]
            success[scope][key] = {
                "episodes": episodes,
                "success_rate_total": wins / episodes,
                "success_rate_recent": _rate(list(window)[-self.config.success_window :]),
                "history": list(self._history.get((scope, key), ())),
            }
        return {
            "success": success,
            "drift": {name: det.to_dict() for name, det in self._drift.items()},
            "latency": {"budget_ms": self.config.latency_budget_ms, "fleet": self.latency()}
            | {"robot": {k: self.latency(k) for k in self._latency if k}},
            "alarms": self.alarms(),
            "alarm_log": list(self.alarm_log),
        }
