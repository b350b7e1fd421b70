"""One robot's control loop, independent of how the policy is reached (numpy only, no torch, no Ray).

Each `tick()`: start a policy request when the action buffer runs low (never waiting for it),
take a finished reply through confidence -> degradation -> teleoperator review, pop this tick's
action from the buffer, pass it through the safety layer, step the robot. The Ray actor in
`actors/robot.py` drives this with a client over a Serve handle; tests drive it with fakes.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fleet.control import (
    ActionBuffer,
    ConfidenceEstimator,
    DegradationPolicy,
    FeatureStats,
    SafetyConfig,
    SafetyLayer,
    State,
)
from fleet.embodiments import get_embodiment
from fleet.protocol import make_request


class PolicyClient(Protocol):
    """Non-blocking access to the policy server."""

    def submit(self, request: dict) -> None:
        """Start one act request; at most one is outstanding per robot."""

    def poll(self) -> dict | None:
        """The finished reply, or None while it is in flight. Raises if the request failed."""


@dataclass(frozen=True)
class RobotConfig:
    robot_id: str
    # unique name of this robot in the fleet
    embodiment: str
    # key into EMBODIMENTS
    seed: int = 0
    # first episode's seed; episode k uses seed * 100_003 + k
    shift: str | None = None
    # simulator distribution shift(s), e.g. "actuator_bias"
    realtime: bool = False
    # hold the embodiment's control rate (True) or run as fast as possible (sim mode)
    aggregate: str = "latest"
    # how overlapping chunks are merged (ActionBuffer)
    n_samples: int = 4
    # flow samples per request, for the disagreement confidence (token heads report entropy instead)
    teleop: bool = True
    # a scripted human reviews every new chunk and corrects strays
    teleop_tolerance: float = 0.15
    # the human's tolerance (share of action range)
    stale_ticks: int | None = None
    # an action whose observation is older than this many ticks is held; None = recompute_every + 2, so a
    # dead or hung server stops the robot within two control periods of the chunk it should have replaced
    max_consecutive_failures: int = 5
    # more failed episodes in a row than this escalates the robot (it stops until reset)


@dataclass
class TickResult:
    tick: int
    state: str
    moved: bool
    episode_done: bool
    success: bool


class RobotLoop:
    """A simulated robot with its robot-side stack. `corrections` receives lists of correction dicts."""

    def __init__(
        self,
        config: RobotConfig,
        client: PolicyClient,
        corrections: Callable[[list[dict]], None] | None = None,
        feature_stats: dict | None = None,
    ):
        from fleet.control.degradation import DegradationConfig
        from fleet.sim import make_env
        from fleet.sim.teleop import TeleopConfig, Teleoperator

        self.config = config
        self.spec = spec = get_embodiment(config.embodiment)
        self.client = client
        self.sink = corrections
        self.env = make_env(config.embodiment, shift=config.shift)
        self.buffer = ActionBuffer(spec.chunk_size, spec.recompute_every, config.aggregate)
        stale = config.stale_ticks if config.stale_ticks is not None else spec.recompute_every + 2
        self.stale_ticks = stale
        self.safety = SafetyLayer(spec, SafetyConfig(max_action_age_s=stale * spec.dt, stop_action=spec.stop_action))
        stats = FeatureStats.from_dict(feature_stats) if feature_stats else None
        self.confidence = ConfidenceEstimator(feature_stats=stats)
        self.degradation = DegradationPolicy(DegradationConfig(max_consecutive_failures=config.max_consecutive_failures))
        self.teleop = Teleoperator(TeleopConfig(tolerance=config.teleop_tolerance)) if config.teleop else None
        self.episode = 0
        self.tick_in_episode = 0
        self.total_ticks = 0
        self.episodes_done = 0
        self.successes = 0
        self.interventions = 0
        self.corrections_sent = 0
        self.moved_ticks = 0
        self.held_ticks = 0
        self.policy_calls = 0
        self.failed_calls = 0
        self.head_version: int | None = None
        self.latencies_ms: deque[float] = deque(maxlen=512)
        self.outcomes: deque[bool] = deque(maxlen=100)
        self.last_error: str | None = None
        self._request_started: float | None = None
        self._request_obs: dict | None = None
        self._request_tick = 0
        self._last_force = 0.0
        self._pending_corrections: list[dict] = []
        self._reset_episode()

    # ---- episode ---------------------------------------------------------------------------------
    def _reset_episode(self) -> None:
        seed = self.config.seed * 100_003 + self.episode
        self.obs, _ = self.env.reset(seed=seed)
        self.buffer.reset()
        self.safety.reset()
        self.tick_in_episode = 0
        self._last_force = 0.0
        self._request_started = None
        self._request_obs = None

    # ---- one control tick ------------------------------------------------------------------------
    def tick(self) -> TickResult:
        t_now = time.perf_counter()
        self._receive(t_now)
        self._maybe_request(t_now)
        state = self.degradation.state
        action = self.buffer.pop(self.tick_in_episode)
        age = None
        if action is not None and self.buffer.last_obs_tick is not None:
            age = (self.tick_in_episode - self.buffer.last_obs_tick) * self.spec.dt
        if state in (State.PAUSED, State.ESCALATED):
            action = None  # not allowed to move: the safety layer holds
        self.safety.velocity_scale = self.degradation.velocity_scale
        sent, report = self.safety(action, force=self._last_force, age_s=age)
        if report.estop:
            # a latched e-stop is an operator's call in reality; the simulated human resets it once stopped
            self.safety.reset_estop()
        moved = not report.held
        self.moved_ticks += int(moved)
        self.held_ticks += int(not moved)
        sent = np.clip(np.asarray(sent, np.float32), self.spec.action_low, self.spec.action_high)
        self.obs, _, term, trunc, info = self.env.step(sent)
        self._last_force = float(info.get("force", 0.0))
        self.tick_in_episode += 1
        self.total_ticks += 1
        done = term or trunc
        success = bool(info["is_success"])
        if done:
            self._end_episode(success)
        return TickResult(self.total_ticks, self.degradation.state.value, moved, done, success)

    def _end_episode(self, success: bool) -> None:
        self.episodes_done += 1
        self.successes += int(success)
        self.outcomes.append(success)
        self.degradation.episode_end(success)
        if self.degradation.state is State.HUMAN:
            self.degradation.human_release()
        if self.degradation.state is State.PAUSED:
            # the simulated operator answers the pause at the episode boundary
            self.degradation.human_takeover()
            self.degradation.human_release()
        self.episode += 1
        self._reset_episode()
        self.flush_corrections()

    def _maybe_request(self, t_now: float) -> None:
        if self._request_started is not None or not self.buffer.needs_refill(self.tick_in_episode):
            return
        if self.degradation.state is State.ESCALATED:
            return
        req = make_request(
            self.config.robot_id,
            self.config.embodiment,
            self.obs,
            obs_tick=self.tick_in_episode,
            n_samples=self.config.n_samples if self.spec.head == "flow" else 1,
            request_id=f"{self.config.robot_id}:{self.episode}:{self.tick_in_episode}",
        )
        try:
            self.client.submit(req)
        except Exception as exc:  # noqa: BLE001 - a dead server must never stop the control loop
            self.failed_calls += 1
            self.last_error = f"submit failed: {exc}"
            return
        self._request_started = t_now
        self._request_obs = {"obs": self.obs, "tick": self.tick_in_episode, "episode": self.episode}
        self.buffer.mark_requested(self.tick_in_episode)

    def _receive(self, t_now: float) -> None:
        if self._request_started is None:
            return
        try:
            reply = self.client.poll()
        except Exception as exc:  # noqa: BLE001
            self.failed_calls += 1
            self.last_error = f"policy request failed: {exc}"
            self._request_started = None
            self.buffer.cancel_request()
            return
        if reply is None:
            return
        self.latencies_ms.append((t_now - self._request_started) * 1e3)
        self._request_started = None
        self.policy_calls += 1
        self.last_error = None
        req = self._request_obs
        if req is None or req["episode"] != self.episode:
            self.buffer.cancel_request()
            return  # a reply for an episode that already ended
        self.head_version = int(reply.get("head_version", 0))
        chunk = np.asarray(reply["chunk"], np.float32)
        conf = self.confidence.estimate(reply)
        self.degradation.update(conf, tick=self.tick_in_episode)
        obs_tick = req["tick"]
        if self.teleop is not None:
            chunk, obs_tick = self._review(chunk, obs_tick)
        self.buffer.push(chunk, obs_tick)

    def _review(self, chunk: np.ndarray, obs_tick: int) -> tuple[np.ndarray, int]:
        """The human judges what is left of the proposal from now on, and corrects it if it strays."""
        now = self.tick_in_episode
        rest = chunk[min(now - obs_tick, len(chunk) - 1) :]
        proposal = np.concatenate([rest, np.repeat(rest[-1:], len(chunk) - len(rest), axis=0)])
        asked = self.degradation.needs_human
        decision = self.teleop.review(self.env, proposal, asked_for_help=asked)
        if not decision.override:
            if self.degradation.state is State.HUMAN:
                self.degradation.human_release(tick=now)
            return chunk, obs_tick
        if self.degradation.state is not State.HUMAN:
            self.degradation.human_takeover(tick=now)
        self.interventions += 1
        self._pending_corrections.append(
            {
                "id": uuid.uuid4().hex,
                "robot_id": self.config.robot_id,
                "embodiment": self.config.embodiment,
                "episode": self.episode,
                "tick": now,
                "timestamp": time.time(),
                "image": self.obs["image"],
                "proprio": self.obs["proprio"],
                "instruction": self.obs["instruction"],
                "policy_chunk": proposal.astype(np.float32),
                "corrected_chunk": decision.chunk.astype(np.float32),
                "head_version": int(self.head_version or 0),
                "reason": decision.reason,
                "shift": self.config.shift or "",
            }
        )
        return decision.chunk, now

    def flush_corrections(self) -> int:
        """Hand pending corrections to the sink; kept for the next try if the sink fails."""
        if not self._pending_corrections or self.sink is None:
            return 0
        batch, self._pending_corrections = self._pending_corrections, []
        try:
            self.sink(batch)
        except Exception as exc:  # noqa: BLE001
            self._pending_corrections = batch + self._pending_corrections
            self.last_error = f"correction sink failed: {exc}"
            return 0
        self.corrections_sent += len(batch)
        return len(batch)

    # ---- reporting -------------------------------------------------------------------------------
    def report(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else None
        return {
            "id": self.config.robot_id,
            "embodiment": self.config.embodiment,
            "state": self.degradation.state.value,
            "episodes": self.episodes_done,
            "successes": self.successes,
            "success_rate": (self.successes / self.episodes_done) if self.episodes_done else None,
            "recent_success_rate": float(np.mean(self.outcomes)) if self.outcomes else None,
            "interventions": self.interventions,
            "corrections_pending": len(self._pending_corrections),
            "corrections_sent": self.corrections_sent,
            "head_version": self.head_version,
            "ticks": self.total_ticks,
            "held_ticks": self.held_ticks,
            "starved_ticks": self.buffer.stats()["starved_ticks"],
            "policy_calls": self.policy_calls,
            "failed_calls": self.failed_calls,
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
            "latency_p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
            "safety": self.safety.stats(),
            "last_error": self.last_error,
        }
