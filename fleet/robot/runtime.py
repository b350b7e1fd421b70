"""The multi-rate runtime of one robot (numpy only): the deployment picture of the course notes on a `Scheduler`.

    camera loop      camera_hz (30)      robot.read_camera()  -> image buffer (latest frame + its timestamp)
    proprio loop     proprio_hz (100)    robot.read_proprio() -> latest proprio + timestamp
    policy loop      spec.control_hz     observation from the freshest frame and proprio -> RobotLoop.plan()
                                         (policy link, action buffer, confidence, review, SafetyLayer) -> target
    controller loop  the body's rate     force read -> e-stop; stale frame -> hold; CommandController
                     (franka 1 kHz)      interpolates towards the target within per-period limits -> send_action

A body that takes commands only at its control rate (`robot.command_hz` None or not above control_hz) has no
controller loop: the policy loop sends its safe action itself (pass-through, `controller: "pass-through"` in
the report) and reads the force there.

Safety at the controller rate: the force is read every command period and a reading above max_force (or not a
number) latches the SafetyLayer's e-stop and commands the hold in that same period; a camera frame older than
`stale_frames` camera periods makes the controller head for the hold in the period it notices (counted in
`stale_frame_ticks`, and the policy loop holds too). Every command period sends a command, the hold included.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from fleet.control.command import CommandController, CommandLimits
from fleet.embodiments import command_spec
from fleet.robot.loop import RobotLoop
from fleet.robot.scheduler import Scheduler
from fleet.validate import check_int, check_number

LATENCY_SAMPLES = 4096


@dataclass(frozen=True)
class RuntimeConfig:
    """One robot's loop rates."""

    camera_hz: float = 30.0
    # camera frames per second into the image buffer
    proprio_hz: float = 100.0
    # joint / base state reads per second
    command_hz: float | None = None
    # controller loop rate; None = the body's (robot.command_hz, from fleet.embodiments.COMMAND_SPECS for the sims)
    interpolation: float = 0.25
    # the controller moves from one policy action to the next over this share of a policy period, then holds it:
    # a whole period lags every action by one period, which the per-action sim dynamics feel (franka pressed
    # 0.04 m into the table and tripped its force e-stop in 1 of 11 episodes; at 0.25, none in 30 s)
    stale_frames: int = 3
    # a camera frame older than this many camera periods makes the robot hold
    phase: float = 0.0
    # this robot's deadlines are offset by phase * period (in [0, 1)), so robots on one scheduler take turns
    verify: bool = False
    # check every command against the hard limits independently of the controller (the benchmark's violations)

    def __post_init__(self) -> None:
        f = "RuntimeConfig."
        check_number(f + "camera_hz", self.camera_hz, lo=0.1, hi=1000, expected="a rate in [0.1, 1000] Hz")
        check_number(f + "proprio_hz", self.proprio_hz, lo=0.1, hi=10_000, expected="a rate in [0.1, 10000] Hz")
        if self.command_hz is not None:
            check_number(f + "command_hz", self.command_hz, lo=0.1, hi=10_000, expected="None or a rate in Hz")
        check_number(f + "interpolation", self.interpolation, lo=0.01, hi=1, expected="a share in [0.01, 1]")
        check_int(f + "stale_frames", self.stale_frames, lo=1, expected="a positive int")
        check_number(f + "phase", self.phase, lo=0, hi=0.999999, expected="a number in [0, 1)")


class RobotRuntime:
    """The four loops of one `RobotLoop` on a `Scheduler` (shared with other robots or its own)."""

    def __init__(self, loop: RobotLoop, scheduler: Scheduler, config: RuntimeConfig | None = None) -> None:
        self.loop, self.scheduler = loop, scheduler
        self.config = config = config if config is not None else RuntimeConfig()
        self.robot, self.spec = loop.robot, loop.spec
        self.clock = scheduler.clock
        hz = config.command_hz or self.robot.command_hz or self.spec.control_hz
        self.command_hz = float(hz)
        self.passthrough = self.command_hz <= self.spec.control_hz
        self.stale_after = config.stale_frames / config.camera_hz
        self.stop = None if self.spec.stop_action is None else list(self.spec.stop_action)
        self.limits = CommandLimits(self.spec, self.command_hz, command_spec(self.spec.name))
        self.controller = CommandController(self.limits, self._where(), config.interpolation * self.spec.dt)
        self.frame: np.ndarray | None = None
        self.frame_t: float | None = None
        self.proprio: np.ndarray | None = None
        self.proprio_t: float | None = None
        self.stale_frame_ticks = 0  # controller (or pass-through policy) periods held for a stale camera frame
        self.estop_ticks = 0
        self.commands = 0  # commands sent (one per command period, holds included)
        self.send_errors = 0
        self.violations = 0  # verify: commands outside a hard limit
        self._stale = False
        self._frame_at: dict[int, float | None] = {}
        self._chunk_key: tuple[int, int] | None = None
        self._last_request = None
        self._pending_frame_t: float | None = None
        self.latency_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # camera frame -> first command from it
        self.control_cost_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # force check + limits, no send
        self._prev: list[float] | None = None
        self._prev_v: list[float] | None = None
        p = config.phase
        self.loops = [
            scheduler.every(f"{loop.config.robot_id}/camera", config.camera_hz, self.camera_tick, p),
            scheduler.every(f"{loop.config.robot_id}/proprio", config.proprio_hz, self.proprio_tick, p),
        ]
        # the first policy tick comes after the first camera and proprio reads, so it has a frame
        first = 1e-4 + p / config.camera_hz
        policy = scheduler.every(f"{loop.config.robot_id}/policy", self.spec.control_hz, self.policy_tick, p, first)
        self.loops.append(policy)
        if not self.passthrough:
            self.loops.append(
                scheduler.every(f"{loop.config.robot_id}/controller", self.command_hz, self.controller_tick, p, first)
            )

    def _where(self) -> list[float]:
        hold = self.robot.hold_action()
        if hold is None:
            last = self.loop.safety.last_sent
            hold = last if last is not None else np.clip(np.zeros(self.spec.action_dim), *self._bounds())
        return [float(v) for v in hold]

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.spec.action_low), np.asarray(self.spec.action_high)

    # ---- sensors -----------------------------------------------------------------------------------
    def camera_tick(self, now: float) -> None:
        self.frame, self.frame_t = self.robot.read_camera()

    def proprio_tick(self, now: float) -> None:
        self.proprio, self.proprio_t = self.robot.read_proprio()

    def frame_age(self, now: float | None = None) -> float | None:
        if self.frame_t is None:
            return None
        return (self.clock.now() if now is None else now) - self.frame_t

    # ---- policy ------------------------------------------------------------------------------------
    def policy_tick(self, now: float) -> None:
        loop = self.loop
        fresh = self.frame_t is not None and now - self.frame_t <= self.stale_after
        if self.frame is not None and self.proprio is not None:
            loop.obs = {"image": self.frame, "proprio": self.proprio, "instruction": loop.task.instruction}
        plan = loop.plan(hold=not fresh)
        self._note_request()
        if self.passthrough:
            if not fresh:
                self.stale_frame_ticks += 1
            self._send(plan.sent.tolist(), now)
            self._read_force()
        else:
            self.controller.set_target(plan.sent.tolist(), now)
        if not plan.report.held and loop.buffer.last_obs_tick is not None:
            key = (loop.episode, loop.buffer.last_obs_tick)
            if key != self._chunk_key:  # the first action of a new chunk: its frame -> command latency
                self._chunk_key = key
                self._pending_frame_t = self._frame_at.get(key[1])
        if self.passthrough:  # the body took the command at once: its sensors now, as the single-rate loop reads them
            loop.obs = loop.observe()
        done, _ = loop.finish()
        self._note_request()
        if done:  # a new episode: the body is somewhere else now
            self.controller.reset(self._where(), now)
            self._frame_at.clear()
            self._prev = None
            if self.passthrough:
                self._pending_frame_t = None

    def _note_request(self) -> None:
        """Remember which camera frame a request just sent carries (its chunk's frame -> command latency)."""
        req = self.loop.policy.request
        if req is not None and req is not self._last_request:
            self._last_request = req
            self._frame_at[req.tick] = self.frame_t
            self._frame_at.pop(req.tick - 4 * self.spec.chunk_size, None)

    # ---- controller --------------------------------------------------------------------------------
    def _read_force(self) -> None:
        force = self.robot.read_force()
        self.loop._last_force = force
        self.loop.safety.trip_estop(force)

    def controller_tick(self, now: float) -> None:
        """Force -> e-stop, stale frame -> hold, else the interpolated setpoint; one command every period."""
        ctl = self.controller
        c0 = perf_counter()
        try:
            self._read_force()
            if self.loop.safety.estopped:
                self.estop_ticks += 1
                setpoint = ctl.hold(self.stop if self.stop is not None else ctl.x)
            else:
                age = None if self.frame_t is None else now - self.frame_t
                stale = age is None or age > self.stale_after
                if stale:
                    self.stale_frame_ticks += 1
                    if not self._stale:  # head for the hold now, within the rate limits
                        ctl.set_target(self.stop if self.stop is not None else list(ctl.x), now - ctl.period)
                self._stale = stale
                setpoint = ctl.tick(now)
        except Exception:  # noqa: BLE001 - a fault here still commands: where the controller is
            self.loop.tick_errors += 1
            setpoint = ctl.x
        self.control_cost_s.append(perf_counter() - c0)
        self._send(setpoint, now)

    def _send(self, setpoint: list[float], now: float) -> None:
        if self.config.verify:
            self._verify(setpoint)
        try:
            self.robot.send_action(setpoint)
        except Exception as exc:  # noqa: BLE001 - counted; the next period sends again
            self.send_errors += 1
            self.loop.stats.last_error = f"send_action failed: {type(exc).__name__}: {exc}"
            return
        self.commands += 1
        if self._pending_frame_t is not None:
            self.latency_s.append(now - self._pending_frame_t)
            self._pending_frame_t = None

    def _verify(self, x: list[float]) -> None:
        """Independent check of one command against the hard limits (e-stop holds may jump: braking)."""
        lim, bad = self.limits, False
        for i, xi in enumerate(x):
            bad |= not (lim.low[i] - 1e-9 <= xi <= lim.high[i] + 1e-9)
        if self._prev is not None and not self.loop.safety.estopped and not self.passthrough:
            v = [xi - pi for xi, pi in zip(x, self._prev, strict=True)]
            for i, vi in enumerate(v):
                bad |= abs(vi) > lim.vel[i] * (1 + 1e-9) + 1e-12
                if self._prev_v is not None:
                    bad |= abs(vi - self._prev_v[i]) > lim.acc[i] * (1 + 1e-9) + 1e-12
            self._prev_v = v
        else:
            self._prev_v = None
        self._prev = list(x)
        self.violations += bad

    # ---- report ------------------------------------------------------------------------------------
    def report(self) -> dict:
        """Per loop rates and jitter, frame age, holds, latency, controller cost (the `runtime` of a robot report)."""
        lat = np.asarray(self.latency_s) * 1e3 if self.latency_s else None
        cost = np.asarray(self.control_cost_s) * 1e6 if self.control_cost_s else None
        age = self.frame_age()
        return {
            "controller": "pass-through" if self.passthrough else f"interpolating at {self.command_hz:g} Hz",
            "command_hz": self.command_hz,
            "loops": [lp.stats.summary() | {"loop": lp.name.rsplit("/", 1)[1]} for lp in self.loops],
            "frame_age_ms": None if age is None else age * 1e3,
            "stale_frame_ticks": self.stale_frame_ticks,
            "estop_ticks": self.estop_ticks,
            "commands": self.commands,
            "send_errors": self.send_errors,
            "jerk_overrides": self.controller.jerk_overrides,
            "violations": self.violations,
            "controller_tick_us": {
                "p50": float(np.percentile(cost, 50)) if cost is not None else None,
                "p99": float(np.percentile(cost, 99)) if cost is not None else None,
            },
            "frame_to_command_ms": {
                "p50": float(np.percentile(lat, 50)) if lat is not None else None,
                "p99": float(np.percentile(lat, 99)) if lat is not None else None,
            },
        }
