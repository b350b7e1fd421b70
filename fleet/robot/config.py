"""One robot's configuration: `RobotConfig`, the keyword arguments a robot actor is started with, validated on
construction (ValueError naming the field, through fleet.validate)."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.control.action_buffer import AGGREGATES, ALIGNS
from fleet.embodiments import EMBODIMENTS
from fleet.validate import check_bool, check_choice, check_int, check_number, check_str


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
    align: str | None = None
    # where a reply that comes back d ticks after its observation starts (BufferConfig.align): "arrival" runs the
    # chunk from its first action, d ticks behind the world; "time" skips the d actions meant for ticks that
    # passed and runs the rest of the plan open loop. The same when replies come within a control period. None =
    # "arrival", or "time" with aggregate="rtc" (rtc commits time-aligned actions). Under 1-3 ticks of delay
    # "arrival" kept franka at 93-99 % and hello at 100 % where "time" fell to 2.5-33 % and 98-100 %; aloha kept
    # 89 % at one tick (time: 31 %) and 69-70.5 % at two or three (0-1 %); leap was the same either way (README
    # "Late replies"). Ages, and so stale_ticks, are the same in both
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
    # sim mode only: how long a tick waits for the reply in flight (once per request)
    sim_delay_ticks: int | None = 0
    # sim mode only: the inference delay simulated time sees. A tick this many ticks after the request's observation
    # waits for its reply, so a chunk computed for tick t is used from tick t + sim_delay_ticks on (0: from the
    # tick it was computed for, as `fleet eval` runs chunks). None: wait only when the robot would otherwise hold,
    # so the delay is however many ticks the machine runs while the server answers (3 at franka's flat-out pace
    # on 2 cores, where the shipped policy dropped from 97 % to about 77 % and needed the operator about 5 times an
    # episode, measured before late chunks started on arrival)
    integrate_setpoints: bool = False
    # realtime: the simulator takes the controller's setpoints at the body's command rate (franka 1 kHz) and steps
    # with their mean each control period. False: it takes one command per policy action and the controller loop
    # passes the safe action through. The sims' dynamics are written per action, so integrating offsets the
    # world's steps from the camera's frames by up to one period: with the shipped policy franka tripped its force
    # e-stop in 3 of 26 episodes that way (0 of 45 passing through; the benchmark integrates)
    request_timeout_ticks: int | None = None
    # a request unanswered this long is abandoned and sent again; None = 2 * chunk_size. Until then the robot
    # holds but keeps waiting: resending every overdue request would flood a busy server with work nobody reads
    sim: str | None = None
    # the simulator the robot drives (a fleet.sim.make_env name); None = the one named like the embodiment
    demonstrate: bool = False
    # demonstration mode, for a body with no trained head yet (`fleet embodiment add`): the operator (the task's
    # demonstrator) drives every tick and each chunk is stored as a correction with no policy action
    # (fleet.robot.demonstration); the robot switches to the policy at an episode boundary once told
    # (RobotLoop.start_policy). Nothing is asked of the policy server meanwhile
    demo_noise: float = 0.0
    # demonstration mode: Gaussian noise of this share of each dimension's range added to every executed command
    # before the safety layer (DART; fleet.learning.onboard_spec.OnboardSpec.demo_noise). The stored chunks are
    # the operator's intent, so the demonstrations show how to recover from where the noise pushed the robot

    @property
    def sim_name(self) -> str:
        """The simulator to build: `sim`, or the embodiment's own."""
        return self.sim or self.embodiment

    @property
    def buffer_align(self) -> str:
        """The action buffer's alignment: `align`, or its default for the aggregate."""
        return self.align or ("time" if self.aggregate == "rtc" else "arrival")

    def __post_init__(self) -> None:
        f = "RobotConfig."
        check_str(f + "robot_id", self.robot_id)
        check_choice(f + "embodiment", self.embodiment, sorted(EMBODIMENTS))
        check_choice(f + "aggregate", self.aggregate, AGGREGATES)
        if self.align is not None:
            check_choice(f + "align", self.align, ALIGNS)
        if self.align == "arrival" and self.aggregate == "rtc":
            raise ValueError(f"{f}align: expected 'time' with aggregate='rtc' (rtc commits time-aligned actions)")
        check_int(f + "seed", self.seed, lo=0, expected="a non-negative int")
        for name in ("n_samples", "max_consecutive_failures"):
            check_int(f + name, getattr(self, name), lo=1, expected="a positive int")
        for name in ("stale_ticks", "request_timeout_ticks"):
            if getattr(self, name) is not None:
                check_int(f + name, getattr(self, name), lo=1, expected="None or a positive int")
        check_number(f + "demo_noise", self.demo_noise, lo=0, hi=1, expected="a share of the action range in [0, 1]")
        check_bool(f + "demonstrate", self.demonstrate)
        if self.sim is not None:
            check_str(f + "sim", self.sim, expected="None or a simulator name such as 'so100'")
        check_number(f + "sim_wait_s", self.sim_wait_s, lo=0, expected="a non-negative number of seconds")
        if self.sim_delay_ticks is not None:
            check_int(f + "sim_delay_ticks", self.sim_delay_ticks, lo=0, expected="None or a non-negative int (ticks)")
        if self.shift is not None:
            check_str(f + "shift", self.shift, nonempty=False, expected="None or a shift name such as 'actuator_bias'")
