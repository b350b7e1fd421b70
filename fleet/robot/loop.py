"""One robot's control loop, independent of how the policy is reached (numpy only, no torch, no Ray).

Each `RobotLoop.tick()`: take a finished policy reply through confidence -> degradation -> operator review
into the action buffer; abandon a request whose reply could only arrive stale; start the next request when
the buffer runs low (never waiting for it in real time); pop this tick's action, pass it through the safety
layer, step the robot. The Ray actor in `actors/robot.py` drives this with a client over Ray Serve; tests
drive it with the fakes in `tests/mocks/fake_policy.py`.

Timing rule (the design's "holds within two control periods"): a chunk requested at tick d is due at
d + 1. An action is used at most `stale_ticks` (default recompute_every + 1) ticks after the
observation it was computed from, so a dead or hung server makes the safety layer hold from tick d + 2,
and the hold target is reached one tick later for the built-in bodies (velocity-limited ramp).
Sim mode (realtime=False) runs ticks back to back; the tick `sim_delay_ticks` (default 0) after a request's
observation, or any tick that would otherwise hold, waits up to `sim_wait_s` for the reply in flight, so simulated
time advances as fast as the policy answers and sees the same inference delay on every machine.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from fleet.control import (
    ActionBuffer,
    ConfidenceEstimator,
    DegradationConfig,
    DegradationPolicy,
    FeatureStats,
    SafetyConfig,
    SafetyLayer,
    State,
)
from fleet.control.image_ood import ImageStats
from fleet.data.correction import Correction
from fleet.embodiments import get_embodiment
from fleet.protocol import EpisodeOutcome, make_request
from fleet.robot.client import PolicyClient, PolicyLink
from fleet.robot.config import RobotConfig
from fleet.robot.demonstration import DemonstrationLink
from fleet.robot.interface import Robot, Task
from fleet.robot.report import RobotStats, episode_outcome, robot_report
from fleet.robot.review import CorrectionSink, OperatorReview
from fleet.robot.sim_robot import sim_robot
from fleet.sim import make_env

MAX_PENDING_OUTCOMES = 1000
# finished-episode outcomes kept until take_outcomes() collects them (the oldest go first)


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


@dataclass
class Plan:
    """The policy-rate half of a tick: what the safety layer lets the robot do next."""

    sent: np.ndarray
    # (D,) float: the target after the safety layer
    report: object
    # its SafetyReport
    startup: bool
    # the (re)started robot's first command (always the hold)
    state: State
    # degradation state the action was chosen in


class RobotLoop:
    """One robot (a `Robot` body and its `Task`) with its robot-side stack. Without `robot`, the embodiment's
    simulator (`env`, else a new one) is the robot, through `SimRobot`/`SimTask`. `corrections` receives lists of
    `Correction` records; `stats` holds the counters, `report()` the status.

    `tick()` is one control period at the policy rate: `plan()` (policy -> safety), `send_action`, `finish()`
    (task outcome, next request). The multi-rate runtime (fleet/robot/runtime.py) calls `plan` and `finish` from
    its policy loop and sends the commands from its controller loop instead."""

    def __init__(
        self,
        config: RobotConfig,
        client: PolicyClient,
        corrections: CorrectionSink | None = None,
        feature_stats: dict | None = None,
        env=None,
        robot: Robot | None = None,
        task: Task | None = None,
        image_stats: dict | None = None,
    ):
        self.config = config
        self.spec = spec = get_embodiment(config.embodiment)
        self.client = client
        self.sink = corrections
        if robot is None:
            self.env = env if env is not None else make_env(config.sim_name, shift=config.shift)
            robot, task = sim_robot(self.env)
        elif task is None:
            raise ValueError("RobotLoop: a robot needs its task (success and episode resets come from the task)")
        else:
            self.env = getattr(robot, "env", None)  # the simulator, when the robot is one (tests look inside)
        if not robot.is_connected:
            robot.connect()
        self.robot, self.task = robot, task
        self.stale_ticks = stale = config.stale_ticks if config.stale_ticks is not None else spec.recompute_every + 1
        timeout = config.request_timeout_ticks
        self.request_timeout_ticks = timeout if timeout is not None else 2 * spec.chunk_size
        # half a tick of slack: ages are whole ticks, so "older than stale_ticks" never hangs on float rounding
        age_limit = (stale + 0.5) * spec.dt
        guard = getattr(robot, "workspace_guard", None)  # the body's own task-space wall, where it has one
        safety = SafetyConfig(max_action_age_s=age_limit, stop_action=spec.stop_action, workspace_guard=guard)
        self.safety = SafetyLayer(spec, safety)
        stats = FeatureStats.from_dict(feature_stats) if feature_stats else None
        # the camera's own novelty signal (fleet.control.image_ood): a dimmed light or a knocked camera slows the
        # robot even where the backbone's features stay quiet
        images = ImageStats.from_dict(image_stats) if image_stats else None
        self.confidence = ConfidenceEstimator(feature_stats=stats, image_stats=images)
        self._request_image: np.ndarray | None = None  # the frame the request in flight carries
        self._request_obs: dict | None = None  # and its whole observation
        self.degradation = DegradationPolicy(
            DegradationConfig(max_consecutive_failures=config.max_consecutive_failures)
        )
        self.operator = OperatorReview(config, spec)
        self.stats = RobotStats()
        # demonstration mode (RobotConfig.demonstrate): the operator answers every tick's request, until
        # start_policy() switches the robot to `client` at the next episode boundary
        self.demonstrating = config.demonstrate
        self._policy_client = client
        self._demo_link = DemonstrationLink(lambda: self.task.demonstrate(spec.chunk_size), spec)
        self._to_policy = False
        self._span = np.asarray(spec.action_high, np.float32) - np.asarray(spec.action_low, np.float32)
        self._connect()
        self.episode = 0
        self.tick_in_episode = 0
        self.total_ticks = 0
        self.head_version: int | None = None
        self.first_tick: dict | None = None
        self._holding = False
        self._startup_hold = True  # a (re)started robot's first command is the hold, whatever is buffered
        self._newest: tuple[int, int] | None = None  # (obs_tick, end tick) of the newest chunk pushed
        self._last_force = 0.0
        self._episode_versions: set[int] = set()  # head versions whose chunks this episode ran
        self._episode_interventions = 0
        self._episode_outcomes: deque[EpisodeOutcome] = deque(maxlen=MAX_PENDING_OUTCOMES)
        self.tick_errors = 0  # ticks whose planning raised: they still commanded (the hold)
        self.frame_holds = 0  # policy ticks held because the camera frame was too old (multi-rate runtime)
        self._reset_episode()

    # ---- demonstration mode ----------------------------------------------------------------------
    def _connect(self) -> None:
        """The action buffer and the request link of the current mode: in demonstration mode every tick asks the
        operator (each tick's chunk is one demonstration sample); in policy mode every recompute_every ticks."""
        spec, config = self.spec, self.config
        every = 1 if self.demonstrating else spec.recompute_every
        self.buffer = ActionBuffer(spec.chunk_size, every, config.aggregate, align=config.buffer_align)
        client = self._demo_link if self.demonstrating else self._policy_client
        self.policy = PolicyLink(client, spec, self.buffer, self.stats, self.stale_ticks, self.request_timeout_ticks)

    def start_policy(self) -> bool:
        """Leave demonstration mode at the next episode boundary (the body's first head is served); True when the
        robot was demonstrating."""
        self._to_policy = self.demonstrating
        return self.demonstrating

    @property
    def phase(self) -> str:
        return "demonstrations" if self.demonstrating else "policy"

    def _record_demonstration(self, chunk: np.ndarray, obs_tick: int) -> None:
        """The operator's chunk for the observation of `obs_tick` (the request's), stored as a correction with no
        policy action."""
        obs = self._request_obs
        self.operator.pending.append(
            Correction.new(
                robot_id=self.config.robot_id,
                embodiment=self.config.embodiment,
                episode=self.episode,
                tick=obs_tick,
                image=obs["image"],
                proprio=obs["proprio"],
                instruction=obs["instruction"],
                policy_chunk=None,
                corrected_chunk=np.asarray(chunk, np.float32),
                head_version=0,
                reason="demo",
                shift=self.config.shift or "",
            )
        )
        self.stats.demonstrations += 1

    # ---- episode ---------------------------------------------------------------------------------
    def _reset_episode(self) -> None:
        if self._to_policy:  # switch at the boundary: the new episode is the first the policy drives
            self.demonstrating = self._to_policy = False
            self.stats.latencies_ms.clear()  # the operator's answers are no policy latency
            self._connect()
        self._noise_rng = np.random.default_rng([self.config.seed, self.episode])
        seed = self.config.seed * 100_003 + self.episode
        self.task.reset(seed)
        self.obs = self.observe()
        self.buffer.reset()
        # the first command of an episode (and of a restarted robot) is rate-limited from where the body is
        self.safety.reset(last_action=self.robot.hold_action())
        self.tick_in_episode = 0
        self._last_force = 0.0
        self._newest = None
        self._episode_versions = set()
        self._episode_interventions = 0
        if self.policy.request is not None:
            self.policy.drop()

    # ---- one control tick ------------------------------------------------------------------------
    def observe(self) -> dict:
        """The policy's observation now: the robot's sensors and the task's instruction."""
        o = self.robot.get_observation()
        return {"image": o["image"], "proprio": o["proprio"], "instruction": self.task.instruction}

    def tick(self) -> TickResult:
        """One control period: plan (receive, request, pick this tick's action, safety), command the robot, finish
        (task outcome, the next request)."""
        plan = self.plan()
        self.robot.send_action(plan.sent)
        self._last_force = float(self.robot.read_force())
        self.obs = self.observe()
        done, success = self.finish()
        return TickResult(
            self.total_ticks,
            self.degradation.state.value,
            not plan.report.held,
            done,
            success,
            plan.sent,
            ("startup",) + plan.report.fired if plan.startup else plan.report.fired,
        )

    def plan(self, hold: bool = False) -> Plan:
        """The policy-rate half of a tick: the action for this period through the safety layer. Never raises for a
        fault inside: an exception while choosing the action is counted and the period commands the hold.
        `hold` forces the hold (the runtime's stale camera frame)."""
        startup = self._startup_hold
        state = self.degradation.state
        try:
            action, age, state = self._choose(startup)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the robot without a command: hold
            self.tick_errors += 1
            self.stats.last_error = f"control tick error: {type(exc).__name__}: {exc}"
            action, age = None, None
            if self.policy.request is None:  # a reply taken but never buffered: ask again next tick
                self.buffer.cancel_request()
        if hold:
            action, age = None, None
            self.frame_holds += 1
        if action is not None and self.demonstrating and self.config.demo_noise > 0:
            # DART: the executed command strays from the operator's; what is stored is the operator's intent
            noise = self.config.demo_noise * self._span * self._noise_rng.standard_normal(self.spec.action_dim)
            action = np.clip(action + noise.astype(np.float32), self.spec.action_low, self.spec.action_high)
        try:
            self.safety.velocity_scale = self.degradation.velocity_scale
            proprio = self.obs.get("proprio") if isinstance(self.obs, dict) else None
            sent, report = self.safety(action, force=self._last_force, age_s=age, proprio=proprio)
        except Exception as exc:  # noqa: BLE001 - a malformed action from the buffer: hold instead
            self.tick_errors += 1
            self.stats.last_error = f"control tick error: {type(exc).__name__}: {exc}"
            sent, report = self.safety(None, force=self._last_force)
        moved = not report.held
        self.stats.moved_ticks += int(moved)
        self.stats.held_ticks += int(not moved)
        fault = (report.missing or report.stale) and not startup and state not in (State.PAUSED, State.ESCALATED)
        fault = fault and not hold
        self._holding = fault or hold
        if fault:
            self.stats.fault_holds += 1
            if self.stats.link == "ok" or self.stats.last_error is None:
                what = "no action buffered" if report.missing else "the newest action is stale"
                self.stats.last_error = f"holding: {what} (policy reply late or missing)"
        sent = np.clip(np.asarray(sent, np.float32), self.spec.action_low, self.spec.action_high)
        if startup:
            self._startup_hold = False
            fired = ("startup",) + report.fired
            self.first_tick = {"held": bool(report.held), "sent": sent.tolist(), "fired": list(fired)}
        return Plan(sent, report, startup, state)

    def command_hold(self) -> np.ndarray:
        """Command the safety layer's hold now (after a fault outside plan()); returns what was sent."""
        sent, _ = self.safety(None, force=self._last_force)
        sent = np.clip(np.asarray(sent, np.float32), self.spec.action_low, self.spec.action_high)
        self.robot.send_action(sent)
        return sent

    def _choose(self, startup: bool) -> tuple[np.ndarray | None, float | None, State]:
        self._receive()
        self.policy.expire(self.tick_in_episode)
        self._maybe_request()
        req = self.policy.request
        if not startup and not self.config.realtime and req is not None and not req.waited and self._sim_due(req):
            req.waited = True
            self._receive(wait_s=self.config.sim_wait_s)
        state = self.degradation.state
        action = self.buffer.pop(self.tick_in_episode)
        age = None
        if action is not None and self.buffer.last_obs_tick is not None:
            age = (self.tick_in_episode - self.buffer.last_obs_tick) * self.spec.dt
        if state in (State.PAUSED, State.ESCALATED) or startup:
            action, age = None, None  # not allowed to move: the safety layer holds
        return action, age, state

    def finish(self, request: bool = True) -> tuple[bool, bool]:
        """After the period's commands: the task's verdict (a finished episode ends and the next starts), then the
        next request (`request=False`: the next tick asks, with the sensors' newest frame; the multi-rate runtime,
        whose frames come from the camera loop, does so). Returns (episode done, success)."""
        status = self.task.status()
        self.tick_in_episode += 1
        self.total_ticks += 1
        if status.done:
            self._end_episode(status.success)
        # ask now, with the observation the next tick acts on: the reply gets the whole control period to
        # arrive, and its chunk starts at the tick it was planned for. Asking at the start of the next tick
        # instead plans from an observation one action older; with the privileged expert as the policy that
        # lag alone cost franka 89% -> 100% and aloha 85% -> 100% success ("latest" seams, 800 ticks)
        try:
            if request:
                self._maybe_request()
        except Exception as exc:  # noqa: BLE001 - the next tick asks again
            self.tick_errors += 1
            self.stats.last_error = f"control tick error: {type(exc).__name__}: {exc}"
        return status.done, status.success

    def _sim_due(self, req) -> bool:
        """Sim mode: this tick waits for the reply in flight (RobotConfig.sim_delay_ticks)."""
        d = self.config.sim_delay_ticks
        return self._would_hold() or (d is not None and self.tick_in_episode >= req.tick + d)

    def _would_hold(self) -> bool:
        """True when the buffer has no fresh action for this tick (a reply in flight could still bring one)."""
        if self._newest is None:
            return True
        obs_tick, end = self._newest
        t = self.tick_in_episode
        return t >= end or t - obs_tick > self.stale_ticks

    def _end_episode(self, success: bool) -> None:
        cfg = self.config
        self._episode_outcomes.append(
            episode_outcome(
                cfg.robot_id,
                cfg.embodiment,
                self.episode,
                success,
                self._episode_versions,
                self._episode_interventions,
                self.tick_in_episode,
                cfg.shift,
            )
        )
        self.stats.episode_end(success, self._episode_interventions)
        if self.demonstrating:
            self.stats.demo_episodes += 1  # the operator drove: says nothing about the policy's failures
        else:
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

    # ---- policy requests and replies -------------------------------------------------------------
    def _maybe_request(self) -> None:
        if self.policy.request is not None or not self.buffer.needs_refill(self.tick_in_episode):
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
            **(self._prefix() or {}),  # rtc mode: the plan the policy continues
        )
        self.policy.submit(req, self.tick_in_episode, self.episode)
        self._request_image = self.obs.get("image") if isinstance(self.obs, dict) else None
        self._request_obs = self.obs  # what a demonstration's chunk was given (the runtime may refresh self.obs)

    def _prefix(self) -> dict | None:
        """rtc mode: the request's prefix, as the safety layer will send it (it is what the robot executes)."""
        proprio = self.obs.get("proprio") if isinstance(self.obs, dict) else None
        return self.buffer.request_prefix(self.tick_in_episode, lambda plan: self.safety.preview(plan, proprio))

    def _receive(self, wait_s: float = 0.0) -> None:
        """A usable reply: confidence -> degradation -> operator review -> the action buffer."""
        got = self.policy.receive(self.tick_in_episode, self.episode, wait_s)
        if got is None:
            return
        reply, chunk, obs_tick = got
        if self.demonstrating and reply.get("demonstration") is True:
            self._record_demonstration(chunk, obs_tick)  # the operator is the policy: nothing to score or review
            kept = self.buffer.push(chunk, obs_tick)
            if kept:
                self._newest = (obs_tick, self.tick_in_episode + kept)
            return
        self.head_version = int(reply.get("head_version", 0))
        try:
            conf = self.confidence.estimate(reply, image=self._request_image)
        except ValueError as exc:  # malformed uncertainty fields: the chunk is still usable, but unscored
            self.stats.malformed_replies += 1
            self.stats.last_error = f"policy reply: {exc}"
            conf = None
        if conf is not None:
            self.degradation.update(conf, tick=self.tick_in_episode)
        if self.operator.teleop is not None:
            chunk, obs_tick = self._review(chunk, obs_tick)
        kept = self.buffer.push(chunk, obs_tick)
        self._episode_versions.add(self.head_version)
        if kept:  # the buffer placed them from this tick on (whatever its alignment); an overtaken reply keeps none
            self._newest = (obs_tick, self.tick_in_episode + kept)

    def _review(self, chunk: np.ndarray, obs_tick: int) -> tuple[np.ndarray, int]:
        """The human judges the chunk; an override replaces it from now on, with the degradation state HUMAN."""
        now = self.tick_in_episode
        correction = self.operator.review(
            self.task,
            self.obs,
            chunk,
            obs_tick,
            tick=now,
            episode=self.episode,
            head_version=int(self.head_version or 0),
            asked_for_help=self.degradation.needs_human,
        )
        if correction is None:
            if self.degradation.state is State.HUMAN:
                self.degradation.human_release(tick=now)
            return chunk, obs_tick
        if self.degradation.state is not State.HUMAN:
            self.degradation.human_takeover(tick=now)
        self.stats.interventions += 1
        self._episode_interventions += 1
        return correction.corrected_chunk, now

    # ---- episode outcomes and corrections --------------------------------------------------------
    def take_outcomes(self) -> list[EpisodeOutcome]:
        """Finished episodes since the last call, oldest first (the learner's success signal; they cross Ray
        as `to_dict()`). At most MAX_PENDING_OUTCOMES are kept between calls; older ones are dropped."""
        out = list(self._episode_outcomes)
        self._episode_outcomes.clear()
        return out

    def flush_corrections(self) -> int:
        """Hand pending corrections to the sink; kept for the next try if the sink fails."""
        try:
            sent = self.operator.flush(self.sink)
        except Exception as exc:  # noqa: BLE001 - a failing sink must never stop the control loop
            self.stats.last_error = f"correction sink failed: {type(exc).__name__}: {exc}"
            return 0
        self.stats.corrections_sent += sent
        return sent

    # ---- reporting -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """ "estop" while the force e-stop is latched; else the degradation state, or "holding" while the
        policy leaves the robot without a fresh action."""
        if self.safety.estopped:
            return "estop"
        return "holding" if self._holding else self.degradation.state.value

    def reset_estop(self) -> bool:
        """An operator's decision: clear a latched force e-stop (nothing else does). True if it was latched."""
        was = self.safety.estopped
        if was:
            self.safety.reset_estop()
            self.stats.estop_resets += 1
        return was

    def report(self) -> dict:
        """The robot's status (fleet.robot.report.robot_report)."""
        return robot_report(self)
