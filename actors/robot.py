"""The robot actor: `fleet.robot.RobotLoop` on Ray, with its control loop in a background thread.

    robot = RobotActor.options(name="robot-franka-0", namespace="fleet").remote(
        {"robot_id": "robot-franka-0", "embodiment": "franka", "realtime": True},
        policy={"route": "gateway", "app": "fleet-policy", "namespace": "fleet"},
        replay={"name": "fleet-replay", "namespace": "fleet"},
    )
    ray.get(robot.report.remote())        # episodes, success_rate, control_hz, latency, state, last_error
    ray.get(robot.stop.remote())          # finish the episode, deliver the corrections, stop

With `outcomes={"name": "fleet-learner", "namespace": "fleet"}` (the fleet runs a learner, `fleet up --adapt`)
the robot also sends every finished episode's outcome, tagged with the head version it ran, to the learner
actor (fire and forget, `OutcomeSink`): the learner's signal for rolling back a head that lowers success.

The actor imports numpy, `fleet.robot` and Ray, never torch, Ray Serve or pyarrow (actors/lean.py), so a robot costs
~120 MB RSS (121 MB measured in `fleet up`).
How it reaches the policy (`policy["route"]`; the clients and sinks are in actors/robot_io.py):
  "gateway"  (default) a `PolicyGateway` actor per node holds the Serve DeploymentHandle; the robot sends
             `gateway.act.remote(request)` and polls the ObjectRef with `ray.wait(timeout=0)`. One Serve
             router per node instead of per robot, and no Serve import in the robot (+35 MB each).
  "handle"   the robot holds the DeploymentHandle itself: submit = `handle.act.remote(request)`, poll =
             `response.result(timeout_s=0)` (TimeoutError = still in flight). Costs the Serve import.
  "direct"   (the fleet's default) a TCP connection straight to a policy replica's direct socket
             (fleet/serving/direct.py), found through the head registry; the gateway serves while none is
             reachable. Saves the ~3 ms of a Serve handle call on every request.
  "none"     no policy: every request fails and the robot holds (lifecycle tests, a dry run).
Neither blocks the control loop. Safety never depends on the server: a slow, hung or dead policy makes
the robot hold (RobotLoop + SafetyLayer stale-action rule), and report() says so in state/last_error.
Ray restarts a dead robot forever (max_restarts=-1); the new incarnation starts a fresh episode with a
fresh safety layer and its first command is the hold. A force e-stop stays latched until an operator resets
it (`reset_estop`, `fleet estop reset ROBOT`), across restarts too: with `state_dir` the actor writes the
latch to `<state_dir>/<robot id>.estop.json` whenever it changes and restores it on start.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path

import ray
from ray.util import metrics as ray_metrics

from actors.lean import ROBOT_RUNTIME_ENV
from actors.robot_io import GATEWAY_PREFIX, MemorySink, ReplaySink, make_client
from fleet.durable import write_text_atomic
from fleet.embodiments import command_spec, get_embodiment
from fleet.names import NAMESPACE
from fleet.protocol import EpisodeOutcome
from fleet.robot import RobotConfig, RobotLoop
from fleet.robot.background import BackgroundClient, DeferredSink, IOThread
from fleet.robot.runtime import RobotRuntime, RuntimeConfig
from fleet.robot.scheduler import Scheduler, WallClock, reduce_timer_slack
from fleet.robot.sim_robot import sim_robot
from fleet.sim import make_env

__all__ = ["GATEWAY_PREFIX", "ROBOT_NUM_CPUS", "OutcomeSink", "RobotActor", "RobotMetrics"]

log = logging.getLogger(__name__)

ROBOT_NUM_CPUS = 0.05
# a simulated robot's control loop is a few hundred microseconds per tick: a twentieth of a core
SNAPSHOT_EVERY_S = 0.25
# how often the control thread refreshes the report (report() never waits for a tick)


# ---- metrics -------------------------------------------------------------------------------------
class RobotMetrics:
    """Fleet metrics through ray.util.metrics (Prometheus on a cluster with a metrics agent), tagged with
    the robot id and its embodiment."""

    LATENCY_BOUNDARIES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000]

    def __init__(self, robot_id: str, embodiment: str) -> None:
        keys = ("robot", "embodiment")
        self.episodes = ray_metrics.Counter("fleet_robot_episodes", "Finished episodes.", tag_keys=keys)
        self.successes = ray_metrics.Counter("fleet_robot_successes", "Successful episodes.", tag_keys=keys)
        self.interventions = ray_metrics.Counter("fleet_robot_interventions", "Human corrections.", tag_keys=keys)
        self.control_hz = ray_metrics.Gauge("fleet_robot_control_hz", "Measured control rate (Hz).", tag_keys=keys)
        self.latency = ray_metrics.Histogram(
            "fleet_robot_policy_latency_ms",
            "Policy round trip seen by the robot (ms).",
            boundaries=self.LATENCY_BOUNDARIES_MS,
            tag_keys=keys,
        )
        tags = {"robot": robot_id, "embodiment": embodiment}
        for m in (self.episodes, self.successes, self.interventions, self.control_hz, self.latency):
            m.set_default_tags(tags)
        self._seen = {"episodes": 0, "successes": 0, "interventions": 0, "latencies": 0}

    def update(self, loop: RobotLoop, control_hz: float | None) -> None:
        """Record what changed since the last call (called from the control thread)."""
        stats = loop.stats
        for name, value in (
            ("episodes", stats.episodes_done),
            ("successes", stats.successes),
            ("interventions", stats.interventions),
        ):
            if value > self._seen[name]:
                getattr(self, name).inc(value - self._seen[name])
                self._seen[name] = value
        new = min(stats.replies - self._seen["latencies"], len(stats.latencies_ms))
        for ms in list(stats.latencies_ms)[len(stats.latencies_ms) - new :] if new > 0 else []:
            self.latency.observe(ms)
        self._seen["latencies"] = stats.replies
        if control_hz is not None:
            self.control_hz.set(control_hz)


def _quiet_degradation_log() -> None:
    """Pauses and takeovers are routine in a fleet (they are in report()["transitions"]); only escalations,
    which need an operator, reach the driver's log."""
    logger = logging.getLogger("fleet.control.degradation")
    if not any(isinstance(f, _EscalationsOnly) for f in logger.filters):
        logger.addFilter(_EscalationsOnly())


class _EscalationsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "escalated" in record.getMessage()


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---- episode outcomes ----------------------------------------------------------------------------
class OutcomeSink:
    """Episode outcomes (`EpisodeOutcome`, sent as `to_dict()`) to the named learner actor (`record_outcomes`),
    without ever blocking the control loop.

    Outcomes are statistics, not records: one batch is in flight at a time, a batch the learner never got
    (dead, restarting, not started yet) is counted in `lost` rather than resent, and at most `limit` wait.
    """

    def __init__(self, name: str, namespace: str | None, retry_after_s: float = 5.0, limit: int = 1000) -> None:
        self.name, self.namespace, self.retry_after_s = name, namespace, retry_after_s
        self.pending: deque[dict] = deque(maxlen=limit)
        self._handle = None
        self._next_lookup = 0.0
        self._inflight: tuple[ray.ObjectRef, int] | None = None
        self.sent = self.lost = 0

    def add(self, outcomes: list[EpisodeOutcome]) -> None:
        self.pending.extend(o.to_dict() for o in outcomes)  # dicts from here on: they cross Ray

    def pump(self) -> None:
        """Settle the batch in flight if it finished; send what waits when nothing is in flight."""
        if self._inflight is not None:
            ref, n = self._inflight
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return
            self._inflight = None
            try:
                ray.get(ref)
                self.sent += n
            except Exception:  # noqa: BLE001 - the learner died or restarts: look it up again later
                self.lost += n
                self._handle = None
        if not self.pending:
            return
        if self._handle is None:
            now = time.monotonic()
            if now < self._next_lookup:
                return
            try:
                self._handle = ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:  # not started (yet): try again later, keep the newest outcomes
                self._next_lookup = now + self.retry_after_s
                return
        batch = list(self.pending)
        self.pending.clear()
        self._inflight = (self._handle.record_outcomes.remote(batch), len(batch))

    def stats(self) -> dict:
        return {"outcomes_sent": self.sent, "outcomes_lost": self.lost, "outcomes_pending": len(self.pending)}


# ---- the actor -----------------------------------------------------------------------------------
class _RobotActor:
    """One simulated robot. Methods: report, ping, stop, reset_estop, reset_degradation, take_corrections,
    start_policy (a robot started in demonstration mode)."""

    def __init__(
        self,
        config: dict,
        policy: dict | None = None,
        replay: dict | None = None,
        feature_stats: dict | None = None,
        metrics: bool = True,
        autostart: bool = True,
        outcomes: dict | None = None,
        state_dir: str | None = None,
        image_stats: dict | None = None,
        embodiment_spec: dict | None = None,
        niceness: int | None = None,
    ) -> None:
        """embodiment_spec: a body the fleet process registry does not have (EmbodimentSpec.to_dict(); one
        `fleet embodiment add` brought in), registered in this process before the config is checked.
        niceness: run every thread of this robot at least this nice (a body being onboarded runs below the
        fleet it joins, whose robots and replicas Ray starts at 15)."""
        if niceness is not None:
            from fleet.policy.openmp import lower_priority  # os only: no torch in a robot

            lower_priority(niceness)
        if embodiment_spec is not None:
            from fleet.embodiments import EMBODIMENTS, EmbodimentSpec, register_embodiment

            spec = EmbodimentSpec.from_dict(embodiment_spec)
            if EMBODIMENTS.get(spec.name) != spec:
                register_embodiment(spec, replace=spec.name in EMBODIMENTS)
        self.config = RobotConfig(**config)
        self.sink = ReplaySink(replay["name"], replay.get("namespace", NAMESPACE)) if replay else MemorySink()
        self.outcome_sink = OutcomeSink(outcomes["name"], outcomes.get("namespace", NAMESPACE)) if outcomes else None
        # the control thread never touches the network: the transport, the sinks and the e-stop file run on
        # worker threads (fleet/robot/background.py); the loop only queues and reads back
        self.client = BackgroundClient(make_client(policy, self.config.robot_id), name=f"policy-{self.config.robot_id}")
        self.deferred = DeferredSink(self.sink)
        robot = task = None
        if self.config.realtime:  # the multi-rate runtime; the sim integrates setpoints if the config says so
            spec, cmd = get_embodiment(self.config.embodiment), command_spec(self.config.embodiment)
            hz = (cmd.command_hz or spec.control_hz) if self.config.integrate_setpoints else spec.control_hz
            substeps = max(1, round(hz / spec.control_hz))
            robot, task = sim_robot(
                make_env(self.config.sim_name, shift=self.config.shift), time.perf_counter, substeps
            )
        self.loop = RobotLoop(
            self.config, self.client, self.deferred, feature_stats, robot=robot, task=task, image_stats=image_stats
        )
        self.runtime: RobotRuntime | None = None
        # a latched force e-stop outlives the actor: written on every latch change, restored on start
        self._estop_file = Path(state_dir) / f"{self.config.robot_id}.estop.json" if state_dir else None
        self._estop_lock = threading.Lock()
        self._estop_saved = self._restore_estop()
        self.metrics = RobotMetrics(self.config.robot_id, self.config.embodiment) if metrics else None
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray's own implementation uses its deprecated actor_id property
            warnings.simplefilter("ignore")
            self.restarted = bool(ctx.was_current_actor_reconstructed)
        _quiet_degradation_log()
        self.node_id = ctx.get_node_id()
        self.started_at = time.time()
        self.state = "starting"
        self.overruns = 0
        self.loop_errors = 0
        self._ticks: deque[float] = deque(maxlen=512)
        self._lock = threading.Lock()  # guards the loop against stop()/reset calls from actor threads
        self._stop = threading.Event()
        self._finish_episode = False
        self._snapshot: dict = self.loop.report()
        self._snapshot_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"control-{self.config.robot_id}", daemon=True)
        self._io = IOThread(self._io_work, 0.02, name=f"io-{self.config.robot_id}")
        self._episodes_at_stop: int | None = None
        if autostart:
            self._io.start()
            self._thread.start()

    # ---- control thread --------------------------------------------------------------------------
    def _control_hz(self) -> float | None:
        ticks = [t for t in self._ticks if t >= self._ticks[-1] - 2.0] if self._ticks else []
        if len(ticks) < 2 or ticks[-1] <= ticks[0]:
            return None
        return (len(ticks) - 1) / (ticks[-1] - ticks[0])

    def _io_work(self) -> None:
        """Everything that may block, off the control thread: corrections to the sink, acknowledgements,
        outcomes to the learner, the e-stop file, metrics."""
        self.deferred.drain()
        self.sink.pump()
        if self.outcome_sink is not None:
            with self._lock:
                outcomes = self.loop.take_outcomes()
            self.outcome_sink.add(outcomes)
            self.outcome_sink.pump()
        if self.loop.safety.estopped != self._estop_saved:
            self._save_estop()
        if self.metrics is not None:
            self.metrics.update(self.loop, self._control_hz())

    def _housekeeping(self, now: float) -> None:
        """Realtime: on the control thread between ticks, memory only."""
        self._ticks.append(now)
        if time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S:
            self._snapshot = self._full_report()
            self._snapshot_at = time.monotonic()
        if self._finish_episode and self._episodes_at_stop is not None:
            if self.loop.stats.episodes_done > self._episodes_at_stop:
                self._stop.set()

    def _full_report(self) -> dict:
        out = self.loop.report()
        if self.runtime is not None:  # realtime: per loop rates and the camera frame's age (fleet status --json)
            rt = out["runtime"] = self.runtime.report()
            out["loop_hz"] = {lp["loop"]: lp["achieved_hz"] for lp in rt["loops"]}
            out["frame_age_ms"] = rt["frame_age_ms"]
        return out

    def _refresh(self) -> None:
        self._snapshot = self._full_report()
        self._snapshot_at = time.monotonic()

    def _run(self) -> None:
        self.state = "running"
        if self.config.realtime:
            self._run_realtime()
        else:
            self._run_sim()
        self.state = "stopping"

    def _run_realtime(self) -> None:
        """The multi-rate runtime on a wall clock: camera, proprio, policy and controller loops on this thread."""
        reduce_timer_slack()
        scheduler = Scheduler(WallClock(), lock=self._lock)
        self.runtime = RobotRuntime(self.loop, scheduler, RuntimeConfig(command_hz=self.loop.robot.command_hz))
        # the snapshot and the policy rate, at the policy rate (report() never waits for the control thread)
        scheduler.every("housekeeping", self.loop.spec.control_hz, self._housekeeping, 0.5)
        scheduler.run(stop=self._stop)

    def _run_sim(self) -> None:
        """Sim mode: policy-rate ticks back to back (the body takes one command per policy action)."""
        while not self._stop.is_set():
            done = False
            try:
                with self._lock:
                    done = self.loop.tick().episode_done
                    if time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S or done:
                        self._refresh()
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the robot moving: command the hold
                self.loop_errors += 1
                self.loop.stats.last_error = f"control loop error: {type(exc).__name__}: {exc}"
                log.exception("robot %s: control tick failed", self.config.robot_id)
                with self._lock:
                    self.loop.command_hold()
            self._ticks.append(time.perf_counter())
            if self._finish_episode and done:
                break
            # let the actor's method threads take the GIL between ticks; a latched e-stop holds at the body's own
            # rate instead of flat out (it moves nothing, and spinning took a core from the other robots)
            time.sleep(self.loop.spec.dt if self.loop.safety.estopped else 0)

    # ---- methods ---------------------------------------------------------------------------------
    def ping(self) -> str:
        return self.config.robot_id

    def report(self) -> dict:
        """The loop's report (at most SNAPSHOT_EVERY_S old while running) plus actor facts."""
        if not self._thread.is_alive():
            with self._lock:
                self._refresh()
        out = dict(self._snapshot)
        out["corrections_queued"] = len(self.deferred)
        if self.state in ("starting", "stopping", "stopped"):
            out["state"] = self.state
        hz = self._control_hz()
        stats = self.sink.stats()
        if self.outcome_sink is not None:
            stats |= self.outcome_sink.stats()
        if hasattr(self.client, "stats"):
            stats |= self.client.stats()
        return (
            out
            | stats
            | {
                "control_hz": hz,
                "target_hz": self.loop.spec.control_hz,
                "mode": "realtime" if self.config.realtime else "sim",
                "overruns": self.overruns,
                "loop_errors": self.loop_errors,
                "restarted": self.restarted,
                "node_id": self.node_id,
                "pid": os.getpid(),
                "rss_mb": _rss_mb(),
                "torch_loaded": "torch" in sys.modules,
                "pyarrow_loaded": "pyarrow" in sys.modules,
                "snapshot_age_s": time.monotonic() - self._snapshot_at if self._snapshot_at else None,
            }
        )

    def stop(self, finish_episode: bool = True, timeout_s: float | None = None) -> dict:
        """Stop the control loop (after the current episode when finish_episode), deliver every correction
        to the replay actor, and return the final report. The actor stays up until killed."""
        if timeout_s is None:
            wait_ticks = self.loop.spec.max_episode_steps + 10
            timeout_s = wait_ticks * (self.loop.spec.dt if self.config.realtime else 0.05) + 30.0
        self._episodes_at_stop = self.loop.stats.episodes_done
        self._finish_episode = finish_episode
        if not finish_episode:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._stop.set()
        self._thread.join(5.0)
        self._io.stop()
        with self._lock:
            self.loop.flush_corrections()  # a partial episode's corrections, when not finished
        self._io_work()  # the last of them, now that the control thread is gone
        self.client.close()
        delivered = self.sink.flush(timeout_s=30.0)
        self.state = "stopped"
        out = self.report()
        out["corrections_delivered"] = delivered
        return out

    # ---- the e-stop latch -------------------------------------------------------------------------
    def _restore_estop(self) -> bool:
        if self._estop_file is None:
            return False
        try:
            latched = json.loads(self._estop_file.read_text()).get("latched") is True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError):
            latched = True  # an unreadable record may hide a latch: stay stopped until an operator resets
        if latched:
            self.loop.safety.latch_estop()
        return latched

    def _save_estop(self) -> None:
        with self._estop_lock:  # the IO thread and an operator's reset both write it
            latched = self.loop.safety.estopped
            if self._estop_file is not None:
                self._estop_file.parent.mkdir(parents=True, exist_ok=True)
                record = {"robot_id": self.config.robot_id, "latched": latched, "t": time.time()}
                write_text_atomic(self._estop_file, json.dumps(record))
            self._estop_saved = latched

    def reset_estop(self) -> dict:
        """An operator's reset of a latched force e-stop (`fleet estop reset ROBOT`): the robot may move again
        from the next tick, through the safety layer as always. Returns {"robot", "was_latched"}."""
        with self._lock:
            was = self.loop.reset_estop()
            self._save_estop()
            self._refresh()
        return {"robot": self.config.robot_id, "was_latched": was}

    def start_policy(self) -> dict:
        """Leave demonstration mode at the next episode boundary (the body's first head is served): the robot
        then asks the policy server, and the operator reviews its chunks as on every other body. Idempotent.
        Returns {"robot", "phase", "switching"}."""
        with self._lock:
            switching = self.loop.start_policy()
        return {"robot": self.config.robot_id, "phase": self.loop.phase, "switching": switching}

    def reset_degradation(self) -> str:
        """An operator's reset: leaves ESCALATED (or any state) for NORMAL."""
        with self._lock:
            return self.loop.reset_degradation()

    def take_corrections(self) -> list[dict]:
        """Corrections held in memory (no replay actor configured); drains them."""
        return self.sink.take() if isinstance(self.sink, MemorySink) else []

    def check_health(self) -> bool:
        return self._thread.is_alive() or self.state in ("starting", "stopped")


# the worker keeps pyarrow out (actors/lean.py): Ray would import it into every worker, ~55 MB a robot
RobotActor = ray.remote(
    num_cpus=ROBOT_NUM_CPUS,
    max_restarts=-1,
    max_concurrency=4,
    runtime_env=ROBOT_RUNTIME_ENV,
)(_RobotActor)
