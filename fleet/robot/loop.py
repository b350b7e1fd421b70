"""One robot's control loop, independent of how the policy is reached (numpy only, no torch, no Ray).

Each `tick()`: take a finished policy reply through confidence -> degradation -> teleoperator review
into the action buffer; abandon a request whose reply could only arrive stale; start the next request
when the buffer runs low (never waiting for it in real time); pop this tick's action, pass it through
the safety layer, step the robot. The Ray actor in `actors/robot.py` drives this with a client over
Ray Serve; tests drive it with the fakes in `tests/mocks/fake_policy.py`.

Timing rule (the design's "holds within two control periods"): a chunk requested at tick d is due at
d + 1. An action is used at most `stale_ticks` (default recompute_every + 1) ticks after the
observation it was computed from, so a dead or hung server makes the safety layer hold from tick d + 2,
and the hold target is reached one tick later for the built-in bodies (velocity-limited ramp).
Sim mode (realtime=False) runs ticks back to back; a tick that would otherwise hold waits up to
`sim_wait_s` for the reply in flight, so simulated time advances as fast as the policy answers.
"""

from __future__ import annotations

import math
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
from fleet.embodiments import EMBODIMENTS, get_embodiment
from fleet.protocol import make_request

MAX_PENDING_OUTCOMES = 1000
# finished-episode outcomes kept until take_outcomes() collects them (the oldest go first)


class PolicyClient(Protocol):
    """Non-blocking access to the policy server; at most one request is outstanding per robot."""

    def submit(self, request: dict) -> None:
        """Start one act request (drops any earlier one still in flight). Raises if it cannot be sent."""

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        """The finished reply, or None while it is in flight after waiting up to `timeout_s` seconds.
        Raises if the request failed (server error reply, dead replica, lost connection)."""

    def cancel(self) -> None:
        """Forget the request in flight (its reply, if it ever comes, is dropped)."""


class PolicyReplyError(RuntimeError):
    """The server answered, but not with a usable chunk (an error reply or a malformed one)."""


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
    # an action computed from an observation more than this many ticks old is held; None = recompute_every + 1,
    # so a server that answers within a control period never causes a hold, and a dead one holds at due + 1
    max_consecutive_failures: int = 5
    # more failed episodes in a row than this escalates the robot (it stops until reset)
    sim_wait_s: float = 5.0
    # sim mode only: how long a tick that would hold waits for the reply in flight (once per request)
    request_timeout_ticks: int | None = None
    # a request unanswered this long is abandoned and sent again; None = 2 * chunk_size. Until then the robot
    # holds but keeps waiting: resending every overdue request would flood a busy server with work nobody reads

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"RobotConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if not isinstance(self.robot_id, str) or not self.robot_id.strip():
            fail("robot_id", "a non-empty string")
        if self.embodiment not in EMBODIMENTS:
            fail("embodiment", f"one of {sorted(EMBODIMENTS)}")
        for name in ("seed",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(name, "a non-negative int")
        for name in ("n_samples", "max_consecutive_failures"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(name, "a positive int")
        for name in ("stale_ticks", "request_timeout_ticks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                fail(name, "None or a positive int")
        w = self.sim_wait_s
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            fail("sim_wait_s", "a non-negative number of seconds")
        if self.shift is not None and not isinstance(self.shift, str):
            fail("shift", "None or a shift name such as 'actuator_bias'")


@dataclass
class TickResult:
    tick: int
    # ticks since the loop started (all episodes)
    state: str
    # degradation state after the tick
    moved: bool
    # the policy's action was sent (possibly limited); False = the safety layer held
    episode_done: bool
    success: bool
    sent: np.ndarray
    # (D,) the action actually sent to the robot
    fired: tuple[str, ...]
    # safety constraints that acted ("missing", "stale", "velocity", ...), "startup" on the first tick


class RobotLoop:
    """A simulated robot with its robot-side stack. `corrections` receives lists of correction dicts."""

    def __init__(
        self,
        config: RobotConfig,
        client: PolicyClient,
        corrections: Callable[[list[dict]], None] | None = None,
        feature_stats: dict | None = None,
        env=None,
    ):
        from fleet.control.degradation import DegradationConfig
        from fleet.sim import make_env
        from fleet.sim.teleop import TeleopConfig, Teleoperator

        self.config = config
        self.spec = spec = get_embodiment(config.embodiment)
        self.client = client
        self.sink = corrections
        self.env = env if env is not None else make_env(config.embodiment, shift=config.shift)
        self.buffer = ActionBuffer(spec.chunk_size, spec.recompute_every, config.aggregate)
        self.stale_ticks = stale = config.stale_ticks if config.stale_ticks is not None else spec.recompute_every + 1
        timeout = config.request_timeout_ticks
        self.request_timeout_ticks = timeout if timeout is not None else 2 * spec.chunk_size
        # half a tick of slack: ages are whole ticks, so "older than stale_ticks" never hangs on float rounding
        age_limit = (stale + 0.5) * spec.dt
        self.safety = SafetyLayer(spec, SafetyConfig(max_action_age_s=age_limit, stop_action=spec.stop_action))
        stats = FeatureStats.from_dict(feature_stats) if feature_stats else None
        self.confidence = ConfidenceEstimator(feature_stats=stats)
        self.degradation = DegradationPolicy(
            DegradationConfig(max_consecutive_failures=config.max_consecutive_failures)
        )
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
        self.fault_holds = 0  # ticks held because no fresh action was there (server slow, hung or dead)
        self.policy_calls = 0
        self.failed_calls = 0
        self.overdue_calls = 0
        self.late_replies = 0
        self.replies = 0  # every reply received (used, late or malformed): latencies_ms holds the newest
        self.abandoned_calls = 0
        self.malformed_replies = 0
        self.head_version: int | None = None
        self.latencies_ms: deque[float] = deque(maxlen=512)
        self.outcomes: deque[bool] = deque(maxlen=100)
        self.episode_interventions: deque[int] = deque(maxlen=100)  # per recent episode: how often the human stepped in
        self.last_error: str | None = None
        self.link = "ok"  # "ok" | "slow" (last reply too late) | "overdue" (waiting too long) | "down" (failed)
        self.first_tick: dict | None = None
        self._holding = False
        self._startup_hold = True  # a (re)started robot's first command is the hold, whatever is buffered
        self._request: dict | None = None  # the request in flight: started (perf_counter), tick, episode, obs
        self._newest: tuple[int, int] | None = None  # (obs_tick, end tick) of the newest chunk pushed
        self._last_force = 0.0
        self._pending_corrections: list[dict] = []
        self._episode_versions: set[int] = set()  # head versions whose chunks this episode ran
        self._episode_interventions = 0
        self._episode_outcomes: deque[dict] = deque(maxlen=MAX_PENDING_OUTCOMES)
        self._reset_episode()

    # ---- episode ---------------------------------------------------------------------------------
    def _reset_episode(self) -> None:
        seed = self.config.seed * 100_003 + self.episode
        self.obs, _ = self.env.reset(seed=seed)
        self.buffer.reset()
        self.safety.reset()
        self.tick_in_episode = 0
        self._last_force = 0.0
        self._newest = None
        self._episode_versions = set()
        self._episode_interventions = 0
        if self._request is not None:
            self._drop_request()

    # ---- one control tick ------------------------------------------------------------------------
    def tick(self) -> TickResult:
        """One control period: receive, request, pick this tick's action, safety, step the simulator."""
        startup = self._startup_hold
        self._receive()
        self._expire_request()
        self._maybe_request()
        if not startup and not self.config.realtime and self._request is not None and self._would_hold():
            if not self._request["waited"]:
                self._request["waited"] = True
                self._receive(wait_s=self.config.sim_wait_s)
        state = self.degradation.state
        action = self.buffer.pop(self.tick_in_episode)
        age = None
        if action is not None and self.buffer.last_obs_tick is not None:
            age = (self.tick_in_episode - self.buffer.last_obs_tick) * self.spec.dt
        if state in (State.PAUSED, State.ESCALATED) or startup:
            action, age = None, None  # not allowed to move: the safety layer holds
        self.safety.velocity_scale = self.degradation.velocity_scale
        sent, report = self.safety(action, force=self._last_force, age_s=age)
        if report.estop:
            # a latched e-stop is an operator's call in reality; the simulated human resets it once stopped
            self.safety.reset_estop()
        moved = not report.held
        self.moved_ticks += int(moved)
        self.held_ticks += int(not moved)
        fault = (report.missing or report.stale) and not startup and state not in (State.PAUSED, State.ESCALATED)
        self._holding = fault
        if fault:
            self.fault_holds += 1
            if self.link == "ok" or self.last_error is None:
                what = "no action buffered" if report.missing else "the newest action is stale"
                self.last_error = f"holding: {what} (policy reply late or missing)"
        fired = ("startup",) + report.fired if startup else report.fired
        sent = np.clip(np.asarray(sent, np.float32), self.spec.action_low, self.spec.action_high)
        if startup:
            self._startup_hold = False
            self.first_tick = {"held": bool(report.held), "sent": sent.tolist(), "fired": list(fired)}
        self.obs, _, term, trunc, info = self.env.step(sent)
        self._last_force = float(info.get("force", 0.0))
        self.tick_in_episode += 1
        self.total_ticks += 1
        done = bool(term or trunc)
        success = bool(info["is_success"])
        if done:
            self._end_episode(success)
        # ask now, with the observation the next tick acts on: the reply gets the whole control period to
        # arrive, and its chunk starts at the tick it was planned for. Asking at the start of the next tick
        # instead plans from an observation one action older; with the privileged expert as the policy that
        # lag alone cost franka 89% -> 100% and aloha 85% -> 100% success ("latest" seams, 800 ticks)
        self._maybe_request()
        return TickResult(self.total_ticks, self.degradation.state.value, moved, done, success, sent, fired)

    def _would_hold(self) -> bool:
        """True when the buffer has no fresh action for this tick (a reply in flight could still bring one)."""
        if self._newest is None:
            return True
        obs_tick, end = self._newest
        t = self.tick_in_episode
        return t >= end or t - obs_tick > self.stale_ticks

    def _end_episode(self, success: bool) -> None:
        versions = self._episode_versions
        self._episode_outcomes.append(
            {
                "robot_id": self.config.robot_id,
                "embodiment": self.config.embodiment,
                "episode": self.episode,
                "success": bool(success),
                # the one head version every chunk of the episode came from; None when it ran two (a swap
                # mid-episode) or none (it held throughout): such an episode says nothing about one version
                "head_version": next(iter(versions)) if len(versions) == 1 else None,
                "head_versions": sorted(versions),
                "interventions": self._episode_interventions,
                "ticks": self.tick_in_episode,
                "shift": self.config.shift or "",
                "t": time.time(),
            }
        )
        self.episodes_done += 1
        self.successes += int(success)
        self.outcomes.append(success)
        self.episode_interventions.append(self._episode_interventions)
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

    def reset_degradation(self, reason: str = "operator reset") -> str:
        """An operator's reset (the only way out of ESCALATED); returns the new state."""
        return self.degradation.reset(tick=self.tick_in_episode, reason=reason).value

    # ---- policy requests -------------------------------------------------------------------------
    def _drop_request(self) -> None:
        self._request = None
        self.buffer.cancel_request()
        try:
            self.client.cancel()
        except Exception:  # noqa: BLE001 - forgetting a request must never stop the control loop
            pass

    def _maybe_request(self) -> None:
        if self._request is not None or not self.buffer.needs_refill(self.tick_in_episode):
            return
        if self.degradation.state is State.ESCALATED:
            return
        req = make_request(
            self.config.robot_id,
            self.config.embodiment,
            self.obs,
            obs_tick=self.tick_in_episode,
            n_samples=self.config.n_samples if self.spec.head == "flow" else 1,
            request_id=f"{self.config.robot_id}:{self.episode}:{self.tick_in_episode}:{uuid.uuid4().hex[:6]}",
        )
        try:
            self.client.submit(req)
        except Exception as exc:  # noqa: BLE001 - a dead server must never stop the control loop
            self._fail(f"policy submit failed: {type(exc).__name__}: {exc}")
            return
        self._request = {
            "started": time.perf_counter(),
            "tick": self.tick_in_episode,
            "episode": self.episode,
            "waited": False,
            "overdue": False,
        }
        self.buffer.mark_requested(self.tick_in_episode)

    def _fail(self, message: str, link: str = "down") -> None:
        self.failed_calls += int(link == "down")
        self.last_error, self.link = message, link

    def _expire_request(self) -> None:
        """A request whose reply could now only bring stale actions is overdue: the robot holds and says so,
        but keeps waiting (one request in flight per robot bounds a busy server's load); after
        request_timeout_ticks it is abandoned (a hung replica) and asked again."""
        req = self._request
        if req is None:
            return
        waited = self.tick_in_episode - req["tick"]
        secs = time.perf_counter() - req["started"]
        if waited > self.stale_ticks and not req["overdue"]:
            req["overdue"] = True
            self.overdue_calls += 1
            self._fail(f"policy reply overdue: none {waited} ticks ({secs:.2f}s) after the request; holding", "overdue")
        if waited > self.request_timeout_ticks:
            self.abandoned_calls += 1
            self._fail(f"policy request abandoned: no reply in {waited} ticks ({secs:.2f}s); asking again", "overdue")
            self._drop_request()

    def _receive(self, wait_s: float = 0.0) -> None:
        req = self._request
        if req is None:
            return
        try:
            reply = self.client.poll(wait_s) if wait_s > 0 else self.client.poll()
        except Exception as exc:  # noqa: BLE001
            self._fail(f"policy request failed: {type(exc).__name__}: {exc}")
            self._drop_request()
            return
        if reply is None:
            return
        self._request = None
        latency_ms = (time.perf_counter() - req["started"]) * 1e3
        self.latencies_ms.append(latency_ms)
        self.replies += 1
        if self.tick_in_episode - req["tick"] > self.stale_ticks:  # every action in it is already stale
            self.late_replies += 1
            self.last_error, self.link = (
                f"policy reply {latency_ms:.0f} ms late, its actions stale; asking again",
                "slow",
            )
            self.buffer.cancel_request()
            return
        try:
            chunk = self._check_reply(reply)
        except PolicyReplyError as exc:
            self.malformed_replies += 1
            self._fail(str(exc))
            self.buffer.cancel_request()
            return
        self.policy_calls += 1
        self.last_error, self.link = None, "ok"
        if req["episode"] != self.episode:
            self.buffer.cancel_request()
            return  # a reply for an episode that already ended
        self.head_version = int(reply.get("head_version", 0))
        try:
            conf = self.confidence.estimate(reply)
        except ValueError as exc:  # malformed uncertainty fields: the chunk is still usable, but unscored
            self.malformed_replies += 1
            self.last_error = f"policy reply: {exc}"
            conf = None
        if conf is not None:
            self.degradation.update(conf, tick=self.tick_in_episode)
        obs_tick = req["tick"]
        if self.teleop is not None:
            chunk, obs_tick = self._review(chunk, obs_tick)
        self.buffer.push(chunk, obs_tick)
        self._episode_versions.add(self.head_version)
        self._newest = (obs_tick, obs_tick + len(chunk))

    def _check_reply(self, reply: object) -> np.ndarray:
        """The reply's chunk (T, D) float32, or PolicyReplyError naming what is wrong."""
        if not isinstance(reply, dict):
            raise PolicyReplyError(f"policy reply: expected a dict, got {type(reply).__name__}")
        if reply.get("error") is not None:
            raise PolicyReplyError(f"policy server refused the request: {reply['error']}")
        if "chunk" not in reply:
            raise PolicyReplyError("policy reply: no 'chunk'")
        try:
            chunk = np.asarray(reply["chunk"], np.float32)
        except (TypeError, ValueError) as exc:
            raise PolicyReplyError(f"policy reply: chunk is not a numeric array ({exc})") from None
        want = (self.spec.chunk_size, self.spec.action_dim)
        if chunk.ndim != 2 or not 1 <= chunk.shape[0] <= want[0] or chunk.shape[1] != want[1]:
            raise PolicyReplyError(f"policy reply: chunk shape {chunk.shape}, expected (T<={want[0]}, {want[1]})")
        return chunk

    def _review(self, chunk: np.ndarray, obs_tick: int) -> tuple[np.ndarray, int]:
        """The human judges what is left of the proposal from now on, and corrects it if it strays."""
        now = self.tick_in_episode
        rest = chunk[min(now - obs_tick, len(chunk) - 1) :]
        size = self.spec.chunk_size
        proposal = np.concatenate([rest, np.repeat(rest[-1:], size - len(rest), axis=0)])
        asked = self.degradation.needs_human
        decision = self.teleop.review(self.env, proposal, asked_for_help=asked)
        if not decision.override:
            if self.degradation.state is State.HUMAN:
                self.degradation.human_release(tick=now)
            return chunk, obs_tick
        if self.degradation.state is not State.HUMAN:
            self.degradation.human_takeover(tick=now)
        self.interventions += 1
        self._episode_interventions += 1
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
                # non-finite proposals are recorded as the workspace bound they would have been clipped to
                "policy_chunk": np.nan_to_num(proposal.astype(np.float32), nan=0.0, posinf=1e6, neginf=-1e6),
                "corrected_chunk": decision.chunk.astype(np.float32),
                "head_version": int(self.head_version or 0),
                "reason": decision.reason,
                "shift": self.config.shift or "",
            }
        )
        return decision.chunk, now

    # ---- episode outcomes ------------------------------------------------------------------------
    def take_outcomes(self) -> list[dict]:
        """Finished episodes since the last call, oldest first: {"robot_id", "embodiment", "episode", "success",
        "head_version", "head_versions", "interventions", "ticks", "shift", "t"} (the learner's success signal).
        At most MAX_PENDING_OUTCOMES are kept between calls; older ones are dropped."""
        out = list(self._episode_outcomes)
        self._episode_outcomes.clear()
        return out

    # ---- corrections -----------------------------------------------------------------------------
    def flush_corrections(self) -> int:
        """Hand pending corrections to the sink; kept for the next try if the sink fails."""
        if not self._pending_corrections or self.sink is None:
            return 0
        batch, self._pending_corrections = self._pending_corrections, []
        try:
            self.sink(batch)
        except Exception as exc:  # noqa: BLE001
            self._pending_corrections = batch + self._pending_corrections
            self.last_error = f"correction sink failed: {type(exc).__name__}: {exc}"
            return 0
        self.corrections_sent += len(batch)
        return len(batch)

    # ---- reporting -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The degradation state, or "holding" while the policy leaves the robot without a fresh action."""
        return "holding" if self._holding else self.degradation.state.value

    def report(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else None
        return {
            "id": self.config.robot_id,
            "embodiment": self.config.embodiment,
            "state": self.state,
            "degradation": self.degradation.state.value,
            "policy_link": self.link,
            "episodes": self.episodes_done,
            "successes": self.successes,
            "success_rate": (self.successes / self.episodes_done) if self.episodes_done else None,
            "recent_success_rate": float(np.mean(self.outcomes)) if self.outcomes else None,
            # falls as the policy improves: with a human correcting strays, success alone can hide it
            "recent_interventions_per_episode": (
                float(np.mean(self.episode_interventions)) if self.episode_interventions else None
            ),
            "interventions": self.interventions,
            "corrections_pending": len(self._pending_corrections),
            "corrections_sent": self.corrections_sent,
            "head_version": self.head_version,
            "ticks": self.total_ticks,
            "held_ticks": self.held_ticks,
            "fault_holds": self.fault_holds,
            "starved_ticks": self.buffer.stats()["starved_ticks"],
            "policy_calls": self.policy_calls,
            "failed_calls": self.failed_calls,
            "overdue_calls": self.overdue_calls,
            "late_replies": self.late_replies,
            "abandoned_calls": self.abandoned_calls,
            "malformed_replies": self.malformed_replies,
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
            "latency_p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
            "first_tick": self.first_tick,
            "transitions": [t.to_dict() for t in list(self.degradation.transitions)[-5:]],
            "safety": self.safety.stats(),
            "last_error": self.last_error,
        }
