"""Control benchmark: N realtime robots on this machine, each with its four loops, and what the loops achieve.

    fleet bench control --robots 16 --seconds 10 --json --out runs/bench-control

Each robot is the full robot side of a fleet robot (fleet/robot/runtime.py): a simulator behind `SimRobot`
integrating the controller's setpoints, the camera (30 Hz) and proprio (100 Hz) loops, the policy loop
(policy link, action buffer, confidence, degradation, SafetyLayer) at the embodiment's rate and the controller
loop at the body's command rate (franka: 1 kHz), all on a wall clock. The robots of one process share one
`Scheduler` thread (phases spread over the period, so they take turns); `--procs P` spreads them over P
processes. Every command is checked against the hard limits independently of the controller (`violations`).

The policy: by default a synthetic one answering each request after `--policy-latency-ms` with a smooth chunk
inside the workspace (the robot side is what is measured). `--server` instead starts the shipped policy in a
subprocess on the same cores (PolicyRuntime, real batched inference) and the robots' requests go to it over
pipes, through the same non-blocking client a fleet robot uses (fleet/robot/background.py).

Figures per loop: achieved rate, period jitter (start lateness behind the absolute deadline) p50/p99, missed
periods; camera-frame-to-command latency (capture of the frame a chunk was planned from to the first command
from that chunk); controller tick cost in microseconds (force check + interpolation + limits, no simulator).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fleet.embodiments import command_spec, get_embodiment
from fleet.robot.background import BackgroundClient
from fleet.robot.config import RobotConfig
from fleet.robot.loop import RobotLoop
from fleet.robot.runtime import RobotRuntime, RuntimeConfig
from fleet.robot.scheduler import Scheduler, WallClock, reduce_timer_slack, set_realtime_priority
from fleet.robot.sim_robot import sim_robot
from fleet.sim import make_env

LOOPS = ("camera", "proprio", "policy", "controller")
ANSWER_KEYS = ("request_id", "robot_id", "embodiment", "obs_tick")


class SyntheticPolicy:
    """A PolicyClient that answers after `latency_s` (wall clock) with a smooth chunk inside the workspace, with
    a confident uncertainty signal (token: zero entropy; flow: identical samples). Costs microseconds."""

    def __init__(self, embodiment: str, latency_s: float) -> None:
        self.spec = get_embodiment(embodiment)
        self.latency_s = latency_s
        self._pending: tuple[float, dict] | None = None
        lo, hi = np.asarray(self.spec.action_low), np.asarray(self.spec.action_high)
        self._mid, self._amp = (lo + hi) / 2, (hi - lo) / 2
        self._phase = np.linspace(0, np.pi, self.spec.action_dim)

    def submit(self, request: dict) -> None:
        self._pending = (time.perf_counter() + self.latency_s, request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._pending is None:
            return None
        due, request = self._pending
        if time.perf_counter() < due:
            return None
        self._pending = None
        spec = self.spec
        t = request["obs_tick"] + np.arange(spec.chunk_size)
        # half the range at a slow 0.05 cycles per action: well inside every velocity limit
        chunk = (self._mid + 0.5 * self._amp * np.sin(2 * np.pi * 0.05 * t[:, None] + self._phase)).astype(np.float32)
        reply = {"chunk": chunk, "head_version": 1} | {k: request[k] for k in ANSWER_KEYS}
        if spec.head == "flow":
            reply["samples"] = np.repeat(chunk[None], max(2, int(request.get("n_samples", 2))), axis=0)
        else:
            reply["entropy"], reply["n_bins"] = np.zeros(chunk.shape, np.float32), 256
        return reply

    def cancel(self) -> None:
        self._pending = None


def _robot(robot_id: str, embodiment: str, client, phase: float, seed: int, scheduler: Scheduler) -> RobotRuntime:
    spec = get_embodiment(embodiment)
    hz = command_spec(embodiment).command_hz or spec.control_hz
    # the world steps half a period away from this robot's policy tick: the two costly ticks never stack
    substeps = max(1, round(hz / spec.control_hz))
    robot, task = sim_robot(make_env(embodiment), time.perf_counter, substeps, (phase + 0.5) % 1)
    config = RobotConfig(robot_id, embodiment, seed=seed, realtime=True, teleop=False)
    loop = RobotLoop(config, client, robot=robot, task=task)
    return RobotRuntime(loop, scheduler, RuntimeConfig(phase=phase, verify=True))


def run_worker(spec: dict) -> dict:
    """One process's robots on one scheduler for spec["seconds"]; the raw figures (JSON-able)."""
    reduce_timer_slack()
    rt_granted = set_realtime_priority(spec["rt_priority"]) if spec.get("rt_priority") else False
    scheduler = Scheduler(WallClock())
    io_priority = max(1, spec["rt_priority"] - 1) if spec.get("rt_priority") else None
    sys.setswitchinterval(0.0005)  # a thread holding the GIL hands it to the control thread sooner
    server = PipeServer(rt_priority=io_priority) if spec.get("server") else None
    if server is not None:
        server.wait_ready()  # the model loads before any deadline is set
    runtimes = []
    for k, (robot_id, embodiment, phase) in enumerate(spec["robots"]):
        if server is not None:
            client = BackgroundClient(server.client(), name=f"policy-{robot_id}", rt_priority=io_priority)
        else:
            client = SyntheticPolicy(embodiment, spec["latency_ms"] / 1e3)
        runtimes.append(_robot(robot_id, embodiment, client, phase, spec.get("seed", 0) + k, scheduler))
    # what exists now lives as long as the run: out of the cyclic collector's way, and its full passes rarer
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    scheduler.run(until=time.perf_counter() + spec["seconds"])
    out: dict = {
        "loops": {name: {"late_us": [], "hz": [], "target_hz": [], "missed": 0, "periods": 0} for name in LOOPS}
    }
    latency, cost = [], []
    violations = estops = stale = commands = 0
    policy_calls = failed = 0
    for rt in runtimes:
        for lp in rt.loops:
            name = lp.name.rsplit("/", 1)[1]
            st, agg = lp.stats, out["loops"][name]
            agg["late_us"] += [round(x * 1e6, 1) for x in st.late]
            summary = st.summary()
            agg["hz"].append(summary["achieved_hz"])
            agg["target_hz"].append(st.hz)
            agg["missed"] += st.missed
            agg["periods"] += st.ticks + st.missed
        latency += [x * 1e3 for x in rt.latency_s]
        cost += [x * 1e6 for x in rt.control_cost_s]
        violations += rt.violations
        estops += rt.loop.safety.counts["estop_trips"]
        stale += rt.stale_frame_ticks
        commands += rt.commands
        policy_calls += rt.loop.stats.policy_calls
        failed += rt.loop.stats.failed_calls
    if server is not None:
        out["server"] = server.close()
    return out | {
        "rt_priority": rt_granted,
        "latency_ms": latency,
        "controller_us": cost,
        "violations": violations,
        "estop_trips": estops,
        "stale_frame_ticks": stale,
        "commands": commands,
        "policy_calls": policy_calls,
        "failed_calls": failed,
    }


def controller_cost_us(embodiment: str, ticks: int = 20_000) -> dict:
    """The controller tick alone (force check + interpolation + per-period limits), no simulator, no scheduler:
    `ticks` command periods following the synthetic policy's smooth actions. Microseconds per tick."""
    from fleet.control.command import CommandController, CommandLimits
    from fleet.control.safety import SafetyLayer

    spec = get_embodiment(embodiment)
    hz = command_spec(embodiment).command_hz or spec.control_hz
    limits = CommandLimits(spec, hz, command_spec(embodiment))
    lo, hi = np.asarray(spec.action_low), np.asarray(spec.action_high)
    per = max(1, round(hz / spec.control_hz))
    k = np.arange(ticks // per + 1)[:, None]
    actions = (lo + hi) / 2 + 0.25 * (hi - lo) * np.sin(2 * np.pi * 0.05 * k + np.linspace(0, np.pi, spec.action_dim))
    actions = actions.tolist()
    ctl = CommandController(limits, actions[0], 0.25 * spec.dt)
    safety = SafetyLayer(spec)
    dt = 1.0 / hz
    t0 = time.perf_counter()
    for i in range(ticks):
        if i % per == 0:
            ctl.set_target(actions[i // per], i * dt)
        safety.trip_estop(0.0)
        ctl.tick((i + 1) * dt)
    return {"embodiment": embodiment, "dims": spec.action_dim, "us": (time.perf_counter() - t0) / ticks * 1e6}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_control_bench(
    robots: int = 4,
    seconds: float = 10.0,
    embodiment: str = "franka",
    procs: int = 1,
    latency_ms: float = 30.0,
    server: bool = False,
    rt_priority: int | None = 50,
) -> dict:
    """N realtime robots of `embodiment` over `procs` processes for `seconds`; the benchmark's result dict."""
    get_embodiment(embodiment)
    if robots < 1 or procs < 1 or seconds <= 0:
        raise ValueError("robots and procs: expected positive ints, seconds a positive number")
    procs = min(procs, robots)
    groups: list[list] = [[] for _ in range(procs)]
    for i in range(robots):
        groups[i % procs].append(i)
    specs = []
    for g in groups:
        members = [(f"bench-{embodiment}-{i}", embodiment, j / len(g)) for j, i in enumerate(g)]
        specs.append(
            {
                "robots": members,
                "seconds": seconds,
                "latency_ms": latency_ms,
                "server": server,
                "seed": g[0],
                "rt_priority": rt_priority,
            }
        )
    if procs == 1:
        parts = [run_worker(specs[0])]
    else:
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "fleet.bench.control", "--worker", json.dumps(s)],
                stdout=subprocess.PIPE,
                env=env,
            )
            for s in specs
        ]
        parts = []
        for w in workers:
            stdout, _ = w.communicate(timeout=seconds + 600)
            if w.returncode != 0:
                raise RuntimeError(f"bench worker failed with status {w.returncode}")
            parts.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    result = summarize(parts, robots, embodiment, seconds, procs, latency_ms, server)
    result["controller_tick_us_isolated"] = controller_cost_us(embodiment)
    result["rt_priority"] = rt_priority if all(p["rt_priority"] for p in parts) else None
    return result


def summarize(parts: list[dict], robots: int, embodiment: str, seconds: float, procs: int, latency_ms, server) -> dict:
    results = []
    for name in LOOPS:
        late = [x for p in parts for x in p["loops"][name]["late_us"]]
        hz = [h for p in parts for h in p["loops"][name]["hz"] if h is not None]
        target = [h for p in parts for h in p["loops"][name]["target_hz"]]
        if not target:
            continue
        missed = sum(p["loops"][name]["missed"] for p in parts)
        periods = sum(p["loops"][name]["periods"] for p in parts)
        results.append(
            {
                "robots": robots,
                "loop": name,
                "target_hz": float(np.mean(target)),
                "achieved_hz": float(np.mean(hz)) if hz else None,
                "jitter_p50_ms": _pct(late, 50) / 1e3 if late else None,
                "jitter_p99_ms": _pct(late, 99) / 1e3 if late else None,
                "missed_share": missed / periods if periods else 0.0,
            }
        )
    latency = [x for p in parts for x in p["latency_ms"]]
    cost = [x for p in parts for x in p["controller_us"]]
    slowest = {}
    for name in LOOPS:
        hz = [h for p in parts for h in p["loops"][name]["hz"] if h is not None]
        if hz:
            slowest[name] = float(np.min(hz))
    return {
        "results": results,
        "achieved_hz_min": slowest,
        "frame_to_command_ms": {"p50": _pct(latency, 50), "p99": _pct(latency, 99)},
        "violations": sum(p["violations"] for p in parts),
        "controller_tick_us": {"p50": _pct(cost, 50), "p99": _pct(cost, 99)},
        "estop_trips": sum(p["estop_trips"] for p in parts),
        "stale_frame_ticks": sum(p["stale_frame_ticks"] for p in parts),
        "commands": sum(p["commands"] for p in parts),
        "policy_calls": sum(p["policy_calls"] for p in parts),
        "failed_calls": sum(p["failed_calls"] for p in parts),
        "embodiment": embodiment,
        "seconds": seconds,
        "procs": procs,
        "policy": "server" if server else f"synthetic {latency_ms:g} ms",
        "server": [p["server"] for p in parts if "server" in p] or None,
        "machine": {"cpus": os.cpu_count(), "load_1m_after": os.getloadavg()[0]},
    }


def format_table(result: dict) -> str:
    """The figures as an 80-column table."""
    lines = [
        f"{result['results'][0]['robots']} realtime {result['embodiment']} robots, {result['seconds']:g} s, "
        f"{result['procs']} process(es), "
        + (f"SCHED_FIFO {result['rt_priority']}" if result.get("rt_priority") else "normal priority"),
        f"policy: {result['policy']}",
        f"{'loop':<11}{'target Hz':>10}{'achieved':>10}{'min':>9}{'jitter p50':>12}{'p99 ms':>9}{'missed':>10}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['loop']:<11}{r['target_hz']:>10.0f}{_f(r['achieved_hz'], 10, 1)}"
            f"{_f(result['achieved_hz_min'].get(r['loop']), 9, 1)}"
            f"{_f(r['jitter_p50_ms'], 12, 3)}{_f(r['jitter_p99_ms'], 9, 3)}{r['missed_share']:>10.2%}"
        )
    f2c, cost = result["frame_to_command_ms"], result["controller_tick_us"]
    lines.append(f"camera frame -> command: p50 {_f(f2c['p50'], 0, 1)} ms, p99 {_f(f2c['p99'], 0, 1)} ms")
    lines.append(
        f"controller tick (force + interpolate + limits): p50 {_f(cost['p50'], 0, 1)} us, "
        f"p99 {_f(cost['p99'], 0, 1)} us"
    )
    lines.append(
        f"safety violations {result['violations']}, e-stop trips {result['estop_trips']}, "
        f"stale-frame holds {result['stale_frame_ticks']}, load after {result['machine']['load_1m_after']:.1f}"
    )
    return "\n".join(lines)


def _f(v, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{width}.{digits}f}"


def write_outputs(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench-control.json", out / "bench-control.txt"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(format_table(result) + "\n")
    return paths


# the pipe server (--server) lives in its own module; imported late so the default run never loads it
def PipeServer(**kw):  # noqa: N802 - reads as a class at the call site
    from fleet.bench.control_server import PipeServer as _PipeServer

    return _PipeServer(**kw)


if __name__ == "__main__":  # a worker process: python -m fleet.bench.control --worker '<spec json>'
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.stdout.write(json.dumps(run_worker(json.loads(sys.argv[2]))) + "\n")
    else:
        raise SystemExit("usage: python -m fleet.bench.control --worker '<spec json>' (use `fleet bench control`)")
