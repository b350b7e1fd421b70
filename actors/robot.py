"""The robot actor: `fleet.robot.RobotLoop` on Ray, with its control loop in a background thread.

    robot = RobotActor.options(name="robot-franka-0", namespace="fleet").remote(
        {"robot_id": "robot-franka-0", "embodiment": "franka", "realtime": True},
        policy={"route": "gateway", "app": "fleet-policy", "namespace": "fleet"},
        replay={"name": "fleet-replay", "namespace": "fleet"},
    )
    ray.get(robot.report.remote())        # episodes, success_rate, control_hz, latency, state, last_error
    ray.get(robot.stop.remote())          # finish the episode, deliver the corrections, stop

The actor imports numpy, `fleet.robot` and Ray, never torch or Ray Serve, so a robot costs ~130 MB.
How it reaches the policy (`policy["route"]`):
  "gateway"  (default) a `PolicyGateway` actor per node holds the Serve DeploymentHandle; the robot sends
             `gateway.act.remote(request)` and polls the ObjectRef with `ray.wait(timeout=0)`. One Serve
             router per node instead of per robot, and no Serve import in the robot (+35 MB each).
  "handle"   the robot holds the DeploymentHandle itself: submit = `handle.act.remote(request)`, poll =
             `response.result(timeout_s=0)` (TimeoutError = still in flight). Costs the Serve import.
  "none"     no policy: every request fails and the robot holds (lifecycle tests, a dry run).
Neither blocks the control loop. Safety never depends on the server: a slow, hung or dead policy makes
the robot hold (RobotLoop + SafetyLayer stale-action rule), and report() says so in state/last_error.
Ray restarts a dead robot forever (max_restarts=-1); the new incarnation starts a fresh episode with a
fresh safety layer (e-stop clear) and its first command is the hold.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections import deque

import ray

from fleet.robot import RobotConfig, RobotLoop

log = logging.getLogger(__name__)

ROBOT_NUM_CPUS = 0.05
# a simulated robot's control loop is a few hundred microseconds per tick: a twentieth of a core
GATEWAY_PREFIX = "policy-gateway-"
SNAPSHOT_EVERY_S = 0.25
# how often the control thread refreshes the report (report() never waits for a tick)
MAX_PENDING_CORRECTIONS = 5000
# corrections a robot holds while the replay actor is unreachable (~13 kB each); beyond, the oldest go


# ---- policy clients ------------------------------------------------------------------------------
class NoPolicyClient:
    """route "none": every request fails, so the robot holds."""

    def submit(self, request: dict) -> None:
        raise ConnectionError("no policy server configured for this robot")

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        return None

    def cancel(self) -> None:
        pass


class GatewayClient:
    """PolicyClient over this node's PolicyGateway actor: an ObjectRef polled with ray.wait(timeout)."""

    def __init__(self, app: str, namespace: str) -> None:
        self.app, self.namespace = app, namespace
        self._gateway = None
        self._ref = None

    def _get_gateway(self):
        if self._gateway is None:
            self._gateway = gateway_for_this_node(self.app, self.namespace)
        return self._gateway

    def submit(self, request: dict) -> None:
        self._ref = self._get_gateway().act.remote(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._ref is None:
            return None
        ready, _ = ray.wait([self._ref], timeout=timeout_s)
        if not ready:
            return None
        ref, self._ref = self._ref, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            self._gateway = None  # look it up again: Ray may have restarted it elsewhere
            raise

    def cancel(self) -> None:
        ref, self._ref = self._ref, None
        if ref is not None:
            try:  # drops it from the gateway's queue if no replica took it yet; a running batch finishes
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the reply would be ignored anyway
                pass


class HandleClient:
    """PolicyClient over a Serve DeploymentHandle held by the robot itself (imports Ray Serve)."""

    def __init__(self, app: str) -> None:
        from ray import serve

        self.app = app
        self._handle = serve.get_app_handle(app)
        self._response = None

    def submit(self, request: dict) -> None:
        self._response = self._handle.act.remote(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._response is None:
            return None
        try:
            reply = self._response.result(timeout_s=timeout_s)
        except TimeoutError:  # not assigned to a replica yet, or not finished (GetTimeoutError is one too)
            return None
        self._response = None
        return reply

    def cancel(self) -> None:
        self._response = None  # the replica finishes it; nobody reads the reply


class _PolicyGateway:
    """Forwards act requests from the robots on its node to the Serve app (async: many in flight at once)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self._handle = None
        self.calls = 0

    async def act(self, request: dict) -> dict:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app)  # raises while the app does not exist
        self.calls += 1
        return await self._handle.act.remote(request)

    def ping(self) -> dict:
        return {"app": self.app, "calls": self.calls, "node_id": ray.get_runtime_context().get_node_id()}


PolicyGateway = ray.remote(num_cpus=0, max_restarts=-1)(_PolicyGateway)


def gateway_for_this_node(app: str, namespace: str):
    """The detached PolicyGateway of the caller's node, created on first use (`fleet down` removes it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    return PolicyGateway.options(
        name=f"{GATEWAY_PREFIX}{app}-{node_id[:16]}",
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
    ).remote(app)


def make_client(policy: dict | None):
    policy = dict(policy or {"route": "none"})
    route = policy.get("route", "gateway")
    if route == "none":
        return NoPolicyClient()
    if route == "gateway":
        return GatewayClient(policy["app"], policy.get("namespace", "fleet"))
    if route == "handle":
        return HandleClient(policy["app"])
    raise ValueError(f"policy.route: expected 'gateway', 'handle' or 'none', got {route!r}")


# ---- correction sinks ----------------------------------------------------------------------------
class MemorySink:
    """No replay actor configured: keep corrections (bounded) until someone `take()`s them."""

    def __init__(self, limit: int = MAX_PENDING_CORRECTIONS) -> None:
        self.items: deque[dict] = deque(maxlen=limit)
        self.dropped = 0

    def __call__(self, batch: list[dict]) -> None:
        self.dropped += max(0, len(self.items) + len(batch) - (self.items.maxlen or 0))
        self.items.extend(batch)

    def pump(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def take(self) -> list[dict]:
        out = list(self.items)
        self.items.clear()
        return out

    def stats(self) -> dict:
        return {"corrections_held": len(self.items), "corrections_dropped": self.dropped}


class ReplaySink:
    """Sends corrections to the named ReplayActor without blocking the control loop. A batch counts as
    delivered only when the actor acknowledged it (it is durable then); a failed send is retried, and
    correction ids make the retry harmless."""

    def __init__(self, name: str, namespace: str, retry_after_s: float = 1.0) -> None:
        self.name, self.namespace, self.retry_after_s = name, namespace, retry_after_s
        self._actor = None
        self._inflight: list[tuple[ray.ObjectRef, list[dict]]] = []
        self._retry: deque[dict] = deque()
        self._next_retry = 0.0
        self.acked = self.rejected = self.dropped = self.send_errors = 0
        self.last_error: str | None = None

    def __call__(self, batch: list[dict]) -> None:
        self._send(list(batch))

    def _send(self, batch: list[dict]) -> None:
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=self.namespace)
            self._inflight.append((self._actor.add.remote(batch), batch))
        except Exception as exc:  # noqa: BLE001 - keep the batch, try again later
            self._failed(batch, exc)

    def _failed(self, batch: list[dict], exc: BaseException) -> None:
        self._actor = None
        self.send_errors += 1
        self.last_error = f"replay actor {self.name!r}: {type(exc).__name__}: {exc}"
        self._retry.extend(batch)
        while len(self._retry) > MAX_PENDING_CORRECTIONS:
            self._retry.popleft()
            self.dropped += 1
        self._next_retry = time.monotonic() + self.retry_after_s

    def pump(self, timeout_s: float = 0.0) -> None:
        """Collect acknowledgements (waiting up to timeout_s) and resend what failed once its backoff passed."""
        if self._inflight:
            refs = [ref for ref, _ in self._inflight]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            done = set(ready)
            still = []
            for ref, batch in self._inflight:
                if ref not in done:
                    still.append((ref, batch))
                    continue
                try:
                    ack = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    self._failed(batch, exc)
                    continue
                self.acked += len(ack["accepted"]) + len(ack["duplicates"])
                self.rejected += len(ack["rejected"])
                if ack["rejected"]:
                    self.last_error = f"replay store rejected a correction: {ack['rejected'][0]['error']}"
            self._inflight = still
        if self._retry and time.monotonic() >= self._next_retry:
            batch = list(self._retry)
            self._retry.clear()
            self._send(batch)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything sent is acknowledged; True when nothing is left undelivered."""
        deadline = time.monotonic() + timeout_s
        while self._inflight or self._retry:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._next_retry = min(self._next_retry, time.monotonic() + min(left, 0.2))
            self.pump(timeout_s=min(left, 0.5))
            if self._retry and not self._inflight:
                time.sleep(min(0.2, max(0.0, left)))
        return True

    def stats(self) -> dict:
        inflight = sum(len(b) for _, b in self._inflight)
        return {
            "corrections_acked": self.acked,
            "corrections_inflight": inflight + len(self._retry),
            "corrections_rejected": self.rejected,
            "corrections_dropped": self.dropped,
            "replay_errors": self.send_errors,
            "replay_last_error": self.last_error,
        }


# ---- metrics -------------------------------------------------------------------------------------
class RobotMetrics:
    """Fleet metrics through ray.util.metrics (Prometheus on a cluster with a metrics agent), tagged with
    the robot id and its embodiment."""

    LATENCY_BOUNDARIES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000]

    def __init__(self, robot_id: str, embodiment: str) -> None:
        from ray.util import metrics

        keys = ("robot", "embodiment")
        self.episodes = metrics.Counter("fleet_robot_episodes", "Finished episodes.", tag_keys=keys)
        self.successes = metrics.Counter("fleet_robot_successes", "Successful episodes.", tag_keys=keys)
        self.interventions = metrics.Counter("fleet_robot_interventions", "Human corrections.", tag_keys=keys)
        self.control_hz = metrics.Gauge("fleet_robot_control_hz", "Measured control rate (Hz).", tag_keys=keys)
        self.latency = metrics.Histogram(
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
        for name, value in (
            ("episodes", loop.episodes_done),
            ("successes", loop.successes),
            ("interventions", loop.interventions),
        ):
            if value > self._seen[name]:
                getattr(self, name).inc(value - self._seen[name])
                self._seen[name] = value
        calls = loop.policy_calls + loop.malformed_replies
        new = min(calls - self._seen["latencies"], len(loop.latencies_ms))
        for ms in list(loop.latencies_ms)[len(loop.latencies_ms) - new :] if new > 0 else []:
            self.latency.observe(ms)
        self._seen["latencies"] = calls
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


# ---- the actor -----------------------------------------------------------------------------------
class _RobotActor:
    """One simulated robot. Methods: report, ping, stop, reset_degradation, take_corrections."""

    def __init__(
        self,
        config: dict,
        policy: dict | None = None,
        replay: dict | None = None,
        feature_stats: dict | None = None,
        metrics: bool = True,
        autostart: bool = True,
    ) -> None:
        self.config = RobotConfig(**config)
        self.sink = ReplaySink(replay["name"], replay.get("namespace", "fleet")) if replay else MemorySink()
        self.loop = RobotLoop(self.config, make_client(policy), self.sink, feature_stats)
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
        if autostart:
            self._thread.start()

    # ---- control thread --------------------------------------------------------------------------
    def _control_hz(self) -> float | None:
        ticks = [t for t in self._ticks if t >= self._ticks[-1] - 2.0] if self._ticks else []
        if len(ticks) < 2 or ticks[-1] <= ticks[0]:
            return None
        return (len(ticks) - 1) / (ticks[-1] - ticks[0])

    def _refresh(self) -> None:
        self._snapshot = self.loop.report()
        self._snapshot_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.update(self.loop, self._control_hz())

    def _run(self) -> None:
        period = self.loop.spec.dt
        realtime = self.config.realtime
        self.state = "running"
        next_t = time.perf_counter()
        while not self._stop.is_set():
            done = False
            try:
                with self._lock:
                    done = self.loop.tick().episode_done
                    self.sink.pump()
                    if time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY_S or done:
                        self._refresh()
            except Exception as exc:  # noqa: BLE001 - a bug must not leave the robot moving: hold a period
                self.loop_errors += 1
                self.loop.last_error = f"control loop error: {type(exc).__name__}: {exc}"
                log.exception("robot %s: control tick failed", self.config.robot_id)
                time.sleep(period)
            self._ticks.append(time.perf_counter())
            if self._finish_episode and done:
                break
            if realtime:
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.overruns += 1
                    if delay < -period:  # far behind: start afresh rather than burst to catch up
                        next_t = time.perf_counter()
            else:
                time.sleep(0)  # let the actor's method threads take the GIL between ticks
        self.state = "stopping"

    # ---- methods ---------------------------------------------------------------------------------
    def ping(self) -> str:
        return self.config.robot_id

    def report(self) -> dict:
        """The loop's report (at most SNAPSHOT_EVERY_S old while running) plus actor facts."""
        if not self._thread.is_alive():
            with self._lock:
                self._refresh()
        out = dict(self._snapshot)
        if self.state in ("starting", "stopping", "stopped"):
            out["state"] = self.state
        hz = self._control_hz()
        stats = self.sink.stats()
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
                "snapshot_age_s": time.monotonic() - self._snapshot_at if self._snapshot_at else None,
            }
        )

    def stop(self, finish_episode: bool = True, timeout_s: float | None = None) -> dict:
        """Stop the control loop (after the current episode when finish_episode), deliver every correction
        to the replay actor, and return the final report. The actor stays up until killed."""
        if timeout_s is None:
            wait_ticks = self.loop.spec.max_episode_steps + 10
            timeout_s = wait_ticks * (self.loop.spec.dt if self.config.realtime else 0.05) + 30.0
        self._finish_episode = finish_episode
        if not finish_episode:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._stop.set()
        self._thread.join(5.0)
        with self._lock:
            self.loop.flush_corrections()  # a partial episode's corrections, when not finished
        delivered = self.sink.flush(timeout_s=30.0)
        self.state = "stopped"
        out = self.report()
        out["corrections_delivered"] = delivered
        return out

    def reset_degradation(self) -> str:
        """An operator's reset: leaves ESCALATED (or any state) for NORMAL."""
        with self._lock:
            return self.loop.reset_degradation()

    def take_corrections(self) -> list[dict]:
        """Corrections held in memory (no replay actor configured); drains them."""
        return self.sink.take() if isinstance(self.sink, MemorySink) else []

    def check_health(self) -> bool:
        return self._thread.is_alive() or self.state in ("starting", "stopped")


RobotActor = ray.remote(num_cpus=ROBOT_NUM_CPUS, max_restarts=-1, max_concurrency=4)(_RobotActor)
