"""Serving benchmark: what the batched policy server delivers to N robots, against the raw model.

    fleet bench serve --robots 1,4,16,64 --seconds 5 --json --out runs/bench-serve

For each robot count N: N simulated robots in this driver process (asyncio tasks, mixed embodiments
round-robin) each send an act request through a DeploymentHandle, wait for the reply, count the
recompute_every actions it would execute, and ask again (closed loop, as fast as the server answers).
Then the same process times `PolicyRuntime.act_batch` on N requests (the raw batched forward), and
ratio = served calls/s over raw rows/s at the same N.

Why asyncio tasks in one process: on a 2-core machine, robot actors or client threads would each
take CPU and a GIL from the server being measured; one event loop is the cheapest client there is.
Observations are real simulator frames recorded before timing starts, so the simulators' CPU is not
measured either. Ray is imported lazily: `fleet` stays importable without it.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np

from fleet.protocol import make_request, reply_from_wire, request_to_wire
from fleet.serving.direct import HEADER, fleet_token, hello, pack, unpack
from fleet.sim import make_env

FLOW_SAMPLES = 4
# flow-head robots ask for this many samples (RobotConfig's default), token-head robots for 1
OBS_PER_ROBOT = 4
# distinct recorded observations each simulated robot cycles through
ROUTES = ("direct", "handle")
STALE_SLACK_TICKS = 2
# a robot asks for a chunk recompute_every ticks after its observation and may act on it until
# recompute_every + 2 ticks (RobotConfig's default stale bound): 2 ticks of latency are free


def _observations(names: list[str], n_robots: int, seed: int = 0) -> list[list[dict]]:
    """OBS_PER_ROBOT real simulator observations per robot (robot i is embodiment names[i % len])."""
    pools: dict[str, list[dict]] = {}
    per_name = math.ceil(n_robots / len(names)) * OBS_PER_ROBOT
    for name in names:
        env = make_env(name, seed=seed)
        obs, _ = env.reset(seed=seed)
        pool = []
        for k in range(per_name):
            pool.append(obs)
            action = env.unwrapped.expert_action()
            obs, _, term, trunc, _ = env.step(action)
            if term or trunc or k % 7 == 6:
                obs, _ = env.reset(seed=seed + k + 1)
        env.close()
        pools[name] = pool
    robots = []
    for i in range(n_robots):
        name, j = names[i % len(names)], i // len(names)
        robots.append(pools[name][j * OBS_PER_ROBOT : (j + 1) * OBS_PER_ROBOT])
    return robots


def _requests(names: list[str], robots_obs: list[list[dict]], specs) -> list[list[dict]]:
    out = []
    for i, pool in enumerate(robots_obs):
        name = names[i % len(names)]
        k = FLOW_SAMPLES if specs[name].head == "flow" else 1
        out.append([make_request(f"bench-{i}", name, obs, obs_tick=t, n_samples=k) for t, obs in enumerate(pool)])
    return out


def _raw(runtime, requests: list[dict], seconds: float) -> tuple[float, float]:
    """(rows per second, ms per batch) of act_batch on `requests` as one batch."""
    runtime.act_batch(requests)  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        runtime.act_batch(requests)
        n += 1
    per_batch = (time.perf_counter() - t0) / n
    return len(requests) / per_batch, per_batch * 1e3


class _DirectCaller:
    """One bench robot's connection to the replica's direct socket (fleet/serving/direct.py), on the bench's loop."""

    def __init__(self, endpoint: dict) -> None:
        self.endpoint = endpoint
        self._reader = self._writer = None

    async def __call__(self, request: dict) -> dict:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.endpoint["host"], self.endpoint["port"])
            self._writer.write(pack(hello(self.endpoint.get("token") or fleet_token())))  # the socket's first frame
        self._writer.write(pack(request_to_wire(request, binary=True)))
        (size,) = HEADER.unpack(await self._reader.readexactly(HEADER.size))
        return reply_from_wire(unpack(await self._reader.readexactly(size)))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _served(
    handle, robot_reqs: list[list[dict]], names: list[str], seconds: float, specs, endpoint: dict | None = None
) -> dict:
    """Closed-loop robots for `seconds` (after a short warm-up): calls, latencies, starved ticks. With an
    `endpoint` the robots use the replica's direct socket, else Serve handle calls."""
    warm = min(0.5, 0.2 * seconds)
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warm, t_start + warm + seconds
    latencies: list[float] = []
    starved = 0
    errors = 0

    async def robot(i: int) -> None:
        direct = _DirectCaller(endpoint) if endpoint else None
        try:
            await _robot_loop(i, direct or handle.act.remote)
        finally:
            if direct is not None:
                direct.close()

    async def _robot_loop(i: int, call) -> None:
        nonlocal starved, errors
        spec = specs[names[i % len(names)]]
        k = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            reply = await call(robot_reqs[i][k % len(robot_reqs[i])])
            t1 = time.perf_counter()
            k += 1
            if t0 < t_measure:
                continue
            if "error" in reply:
                errors += 1
                continue
            latency = t1 - t0
            latencies.append(latency)
            starved += max(0, math.ceil(latency * spec.control_hz) - STALE_SLACK_TICKS)

    await asyncio.gather(*(robot(i) for i in range(len(robot_reqs))))
    lat = np.asarray(latencies) * 1e3
    return {
        "calls": len(latencies),
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "starved_ticks": int(starved),
    }


def run_serve_bench(
    robot_counts=(1, 4, 16, 64),
    seconds_per_point: float = 5.0,
    checkpoint=None,
    embodiments=None,
    threads: int = 1,
    max_batch_size: int = 64,
    batch_wait_timeout_s: float = 0.0,
    server: dict | None = None,
    routes=("direct",),
) -> dict:
    """{"results": [{robots, actions_per_s, calls_per_s, p50_ms, p99_ms, starved_ticks, raw_per_s, raw_ms,
    ratio, overhead_ms, server_batch}], "config": {...}}.

    Deploys one PolicyServer replica (a fresh local Ray unless one is running; deleted afterwards).
    threads: torch threads of the replica and of the raw measurement alike (1 on 2 cores: the other core
    runs the robots, Ray and Serve). server: more ServeConfig keys for the replica (e.g. forward_thread).
    overhead_ms = p50_ms - raw_ms (what serving adds to one batch).
    routes: how the simulated robots reach the replica, each measured in turn at every robot count:
    "direct" (the replica's TCP socket, the fleet robots' default) and/or "handle" (Serve handle calls).
    """
    # lazily: Ray and the deployments (which import it), torch (the runtime), only when the benchmark runs
    import ray
    from ray import serve

    from deployments.http import start_serve
    from deployments.policy import build_app
    from fleet.serving.runtime import PolicyRuntime

    counts = [int(n) for n in robot_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"robot_counts: expected positive ints, got {robot_counts!r}")
    routes = list(routes)
    if not routes or any(r not in ROUTES for r in routes):
        raise ValueError(f"routes: expected some of {ROUTES}, got {routes!r}")
    device = dict(server or {}).get("device", "cpu")  # the raw forward runs where the replica does
    runtime = PolicyRuntime(checkpoint, threads=threads, max_batch=max(max(counts), max_batch_size), device=device)
    specs = runtime.model.specs
    names = list(embodiments or specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"embodiments: {unknown} not in the model; it has {sorted(specs)}")
    robot_reqs = _requests(names, _observations(names, max(counts)), specs)

    started_ray = not ray.is_initialized()
    if started_ray:
        # Ray starts workers at niceness 15 by default: on a shared machine the replica would be starved
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2))
    start_serve(port=None)  # a free port: never collide with a fleet already serving on 8000
    app_name = f"fleet-bench-{uuid.uuid4().hex[:6]}"
    config = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "num_replicas": 1,
        "threads": threads,
        "max_batch_size": max(max(counts), max_batch_size),
        "batch_wait_timeout_s": batch_wait_timeout_s,
        "registry": None,
        "replica_cpus": 1.0,
    } | dict(server or {})
    results = []
    try:
        handle = serve.run(build_app(config), name=app_name, route_prefix=None)
        handle.act.remote(robot_reqs[0][0]).result()
        endpoint = handle.endpoint.remote().result() if "direct" in routes else None
        if "direct" in routes and endpoint is None:
            raise ValueError("routes: 'direct' needs the replica's direct socket (server config direct=True)")
        for n in counts:
            raw_per_s, raw_ms = _raw(runtime, [r[0] for r in robot_reqs[:n]], seconds_per_point)
            for route in routes:
                results.append(_measure(handle, route, endpoint, robot_reqs[:n], names, seconds_per_point, specs))
                results[-1] |= {
                    "raw_per_s": raw_per_s,
                    "raw_ms": raw_ms,
                    "ratio": results[-1]["calls_per_s"] / raw_per_s,
                }
                if results[-1]["p50_ms"] is not None:
                    results[-1]["overhead_ms"] = results[-1]["p50_ms"] - raw_ms
    finally:
        try:
            serve.delete(app_name)
        finally:
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    return {
        "results": results,
        "config": config
        | {"seconds_per_point": seconds_per_point, "embodiments": names, "cpus": os.cpu_count(), "routes": routes},
    }


def _measure(handle, route: str, endpoint, robot_reqs, names, seconds: float, specs) -> dict:
    """One point: len(robot_reqs) closed-loop robots over `route` for `seconds`."""
    n = len(robot_reqs)
    before = handle.stats.remote().result()
    served = asyncio.run(_served(handle, robot_reqs, names, seconds, specs, endpoint if route == "direct" else None))
    after = handle.stats.remote().result()
    batches = after["batches"] - before["batches"]
    calls_per_s = served["calls"] / seconds
    per_reply = np.mean([specs[names[i % len(names)]].recompute_every for i in range(n)])
    return {
        "robots": n,
        "route": route,
        "actions_per_s": calls_per_s * float(per_reply),
        "calls_per_s": calls_per_s,
        "p50_ms": served["p50_ms"],
        "p99_ms": served["p99_ms"],
        "starved_ticks": served["starved_ticks"],
        "overhead_ms": None,
        "server_batch": (after["rows"] - before["rows"]) / batches if batches else None,
        "errors": served["errors"],
    }


def format_table(result: dict) -> str:
    """The results as an aligned text table."""
    cols = [
        ("robots", "robots", "{:d}"),
        ("route", "route", "{}"),
        ("calls/s", "calls_per_s", "{:.0f}"),
        ("actions/s", "actions_per_s", "{:.0f}"),
        ("p50 ms", "p50_ms", "{:.1f}"),
        ("p99 ms", "p99_ms", "{:.1f}"),
        ("starved", "starved_ticks", "{:d}"),
        ("raw rows/s", "raw_per_s", "{:.0f}"),
        ("raw ms", "raw_ms", "{:.1f}"),
        ("ratio", "ratio", "{:.2f}"),
        ("overhead ms", "overhead_ms", "{:.1f}"),
        ("batch", "server_batch", "{:.1f}"),
    ]
    rows = [[title for title, _, _ in cols]]
    for r in result["results"]:
        rows.append(["-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plot(result: dict, out_dir: str | os.PathLike) -> Path:
    """serve_bench.png in out_dir: served calls/s vs raw rows/s, and p50/p99 latency, against robots."""
    import matplotlib  # lazily: matplotlib only when a plot is written (--out)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    routes = list(dict.fromkeys(r.get("route", "handle") for r in result["results"]))
    for k, route in enumerate(routes):
        res = [r for r in result["results"] if r.get("route", "handle") == route]
        n, color = [r["robots"] for r in res], f"C{k}"
        ax1.plot(n, [r["calls_per_s"] for r in res], "o-", color=color, label=f"served calls/s ({route})")
        ax2.plot(n, [r["p50_ms"] for r in res], "o-", color=color, label=f"p50 ({route})")
        ax2.plot(n, [r["p99_ms"] for r in res], "^:", color=color, label=f"p99 ({route})")
    res = [r for r in result["results"] if r.get("route", "handle") == routes[0]]
    n = [r["robots"] for r in res]
    ax1.plot(n, [r["raw_per_s"] for r in res], "s--", color="gray", label="raw forward rows/s")
    ax1.set(xscale="log", xlabel="robots", ylabel="per second", title="throughput")
    ax1.legend()
    ax2.plot(n, [r["raw_ms"] for r in res], "s--", color="gray", label="raw batch")
    ax2.set(xscale="log", yscale="log", xlabel="robots", ylabel="ms", title="latency")
    ax2.legend()
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serve_bench.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
