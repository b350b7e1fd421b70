"""Graceful degradation: what a robot does when the policy is unsure, keeps failing, or meets something new.

A small state machine driven by confidence checks, episode outcomes and the operator. Every transition is
kept as a `Transition` record (bounded) and logged.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from dataclasses import dataclass

from fleet.control.confidence import Confidence
from fleet.validate import check_bool, check_int, check_number, fail, is_number

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    NORMAL = "normal"  # the policy drives at full speed
    PAUSED = "paused"  # stopped, waiting for a human (low confidence)
    HUMAN = "human"  # a human teleoperates
    ESCALATED = "escalated"  # stopped after repeated failures, fleet alerted; only reset() leaves it
    CONSERVATIVE = "conservative"  # the policy drives slowly (novel scene)


@dataclass(frozen=True)
class DegradationConfig:
    """Thresholds of the state machine."""

    pause_below: float = 0.5
    # NORMAL/CONSERVATIVE -> PAUSED when a (non-novel) confidence check is below this
    recover_above: float = 0.7
    # CONSERVATIVE -> NORMAL after `recover_checks` consecutive checks at or above this and not novel
    recover_checks: int = 3
    # M, the consecutive good checks that end CONSERVATIVE
    max_consecutive_failures: int = 3
    # N: more than N failed episodes in a row -> ESCALATED
    conservative_velocity_scale: float = 0.5
    # velocity_scale for the SafetyLayer while CONSERVATIVE, in (0, 1]
    unknown_is_low: bool = False
    # treat a confidence without any uncertainty signal (known=False) as below pause_below
    history: int = 256
    # transitions kept in memory (older ones are only in the log)

    def __post_init__(self) -> None:
        for name in ("pause_below", "recover_above"):
            check_number(f"DegradationConfig.{name}", getattr(self, name), 0, 1, expected="a number in [0, 1]")
        if self.recover_above < self.pause_below:
            raise ValueError(f"DegradationConfig.recover_above: expected >= pause_below={self.pause_below}")
        for name in ("recover_checks", "max_consecutive_failures", "history"):
            check_int(f"DegradationConfig.{name}", getattr(self, name), lo=1, expected="a positive int")
        s = self.conservative_velocity_scale
        if not (is_number(s) and 0 < s <= 1):
            fail("DegradationConfig.conservative_velocity_scale", "a number in (0, 1]", s)


@dataclass(frozen=True)
class Transition:
    """One state change."""

    source: State  # state before
    target: State  # state after
    reason: str  # why, in words
    tick: int | None  # control tick, if the caller gave one
    t: float | None  # wall-clock or sim time in seconds, if the caller gave one

    def to_dict(self) -> dict:
        return {
            "from": self.source.value,
            "to": self.target.value,
            "reason": self.reason,
            "tick": self.tick,
            "t": self.t,
        }


class DegradationPolicy:
    """NORMAL -> PAUSED (low confidence) -> HUMAN (human_takeover) -> NORMAL (human_release);
    any -> ESCALATED (more than N failed episodes in a row) -> NORMAL only via reset();
    NORMAL -> CONSERVATIVE (novel scene) -> NORMAL after M consecutive confident, non-novel checks.

    A novel scene slows the robot instead of stopping it, even though its ood component drags the confidence
    down, unless another component (flow, entropy) is also below pause_below; a low confidence without
    novelty pauses. Confidence checks are ignored while PAUSED, HUMAN or
    ESCALATED: only the human or reset() moves on from there.
    """

    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = DegradationConfig() if config is None else config
        self._state = State.NORMAL
        self._failures = 0
        self._good_checks = 0
        self.transitions: deque[Transition] = deque(maxlen=self.config.history)

    @property
    def state(self) -> State:
        return self._state

    @property
    def may_move(self) -> bool:
        """False while PAUSED or ESCALATED: the robot must hold."""
        return self._state not in (State.PAUSED, State.ESCALATED)

    @property
    def needs_human(self) -> bool:
        """True while PAUSED (waiting for a takeover) or ESCALATED (fleet alerted)."""
        return self._state in (State.PAUSED, State.ESCALATED)

    @property
    def velocity_scale(self) -> float:
        """Factor for SafetyLayer.velocity_scale: reduced while CONSERVATIVE, else 1.0."""
        return self.config.conservative_velocity_scale if self._state is State.CONSERVATIVE else 1.0

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _go(self, target: State, reason: str, tick: int | None, t: float | None) -> State:
        record = Transition(self._state, target, reason, tick, t)
        self.transitions.append(record)
        level = logging.WARNING if target in (State.ESCALATED, State.PAUSED) else logging.INFO
        log.log(level, "degradation %s -> %s at tick=%s t=%s: %s", record.source.value, target.value, tick, t, reason)
        self._state, self._good_checks = target, 0
        return target

    def update(self, conf: Confidence, tick: int | None = None, t: float | None = None) -> State:
        """One confidence check (one new chunk). Returns the state after it."""
        if not isinstance(conf, Confidence):
            raise ValueError(f"conf: expected a Confidence, got {type(conf).__name__}")
        if self._state not in (State.NORMAL, State.CONSERVATIVE):
            return self._state
        cfg = self.config
        low = conf.value < cfg.pause_below or (not conf.known and cfg.unknown_is_low) or math.isnan(conf.value)
        why = "; ".join(conf.reasons) or f"confidence {conf.value:.2f}"
        if conf.is_novel:
            # novelty alone slows the robot; another weak signal on top of it still pauses
            others = [v for k, v in conf.components.items() if k.endswith("_confidence") and not k.startswith("ood")]
            if others and min(others) < cfg.pause_below:
                return self._go(State.PAUSED, f"novel scene and low confidence: {why}", tick, t)
            self._good_checks = 0
            if self._state is State.NORMAL:
                novel = [r for r in conf.reasons if r.startswith("novel scene")]  # which signal saw it, once
                return self._go(State.CONSERVATIVE, "; ".join(novel) or f"novel scene: {why}", tick, t)
            return self._state
        if low:
            return self._go(State.PAUSED, f"confidence {conf.value:.2f} < {cfg.pause_below:g}: {why}", tick, t)
        if self._state is State.CONSERVATIVE:
            self._good_checks = self._good_checks + 1 if conf.value >= cfg.recover_above else 0
            if self._good_checks >= cfg.recover_checks:
                reason = f"confidence >= {cfg.recover_above:g} for {cfg.recover_checks} checks"
                return self._go(State.NORMAL, reason, tick, t)
        return self._state

    def human_takeover(self, tick: int | None = None, t: float | None = None) -> State:
        """A human takes control (from PAUSED, or overriding NORMAL/CONSERVATIVE). Not from ESCALATED."""
        if self._state is State.ESCALATED:
            raise ValueError("human_takeover: not allowed while escalated; call reset() first")
        if self._state is State.HUMAN:
            return self._state
        return self._go(State.HUMAN, "human takeover", tick, t)

    def human_release(self, tick: int | None = None, t: float | None = None) -> State:
        """The human hands control back: HUMAN -> NORMAL."""
        if self._state is not State.HUMAN:
            raise ValueError(f"human_release: expected state 'human', got {self._state.value!r}")
        return self._go(State.NORMAL, "human released control", tick, t)

    def episode_end(self, success: bool, tick: int | None = None, t: float | None = None) -> State:
        """Record an episode outcome; more than N failures in a row escalates from any state."""
        check_bool("success", success)
        self._failures = 0 if success else self._failures + 1
        n = self.config.max_consecutive_failures
        if self._failures > n and self._state is not State.ESCALATED:
            return self._go(State.ESCALATED, f"{self._failures} consecutive failed episodes > {n}", tick, t)
        return self._state

    def reset(self, tick: int | None = None, t: float | None = None, reason: str = "reset") -> State:
        """An operator's explicit reset: back to NORMAL from any state, failure count cleared."""
        self._failures = 0
        if self._state is State.NORMAL:
            return self._state
        return self._go(State.NORMAL, reason, tick, t)
