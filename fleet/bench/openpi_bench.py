"""`fleet bench serve --route openpi,peer`: our openpi endpoint against openpi's own server design, same clients.

    fleet bench serve --route openpi,peer --robots 1,4,16 --seconds 5 --repeats 3 --client-python /tmp/openpi/bin/python

Two servers run side by side on the same model and torch threads: a fleet PolicyServer replica with its openpi
endpoint (fleet/serving/openpi.py: requests join the replica's batches) and the peer (fleet/bench/openpi_peer.py:
openpi's WebsocketPolicyServer design, `infer` inline per request, no batching). For each robot count N, N client
processes (fleet/bench/openpi_load.py; openpi-client's `WebsocketClientPolicy` when --client-python names a python
that has it) connect to both, then follow one schedule of alternating windows (openpi, peer, peer, openpi, ...:
drift on a shared machine hits both alike), each a closed loop of `infer` calls on the same recorded simulator
observations. Reported per N and route: the median over windows of calls/s, and latency percentiles over all calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from fleet.bench.serve import _observations
from fleet.cluster.endpoints import free_port

WARM_S = 0.5
GAP_S = 0.3
OPENPI_ROUTES = ("openpi", "peer")


def _wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.2)


def _write_obs(tmp: Path, names: list[str], n: int) -> list[tuple[str, Path]]:
    """One npz of recorded observations per robot (robot i is names[i % len(names)])."""
    out = []
    for i, pool in enumerate(_observations(names, n)):
        path = tmp / f"robot-{i}.npz"
        np.savez(
            path,
            image=np.stack([o["image"] for o in pool]),
            state=np.stack([o["proprio"] for o in pool]),
            prompt=np.array([o["instruction"] for o in pool]),
        )
        out.append((names[i % len(names)], path))
    return out


def _schedule(repeats: int, seconds: float, start: float) -> list[dict]:
    order = []
    for r in range(repeats):  # ABBA: openpi, peer, peer, openpi, ...
        order += list(OPENPI_ROUTES) if r % 2 == 0 else list(reversed(OPENPI_ROUTES))
    windows, t = [], start
    for route in order:
        windows.append({"route": route, "start": t, "measure_from": t + WARM_S, "end": t + WARM_S + seconds})
        t += WARM_S + seconds + GAP_S
    return windows


def _point(n, robots, urls, token, client_python, repeats, seconds) -> tuple[list[dict], str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = []
    for name, obs in robots[:n]:
        cmd = [client_python, "-m", "fleet.bench.openpi_load", "--obs", str(obs), "--token", token]
        cmd += [f"--url={route}={url}/{name}" for route, url in urls.items()]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"bench client did not start: {line!r} (exit {proc.poll()})")
        schedule = _schedule(repeats, seconds, time.time() + 0.5)
        for proc in procs:
            proc.stdin.write(json.dumps(schedule) + "\n")
            proc.stdin.flush()
        outs = [json.loads(proc.stdout.readline()) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.wait(timeout=30)
    return outs, outs[0]["client"]


def run_openpi_bench(
    robot_counts=(1, 4, 16),
    seconds_per_point: float = 5.0,
    repeats: int = 3,
    checkpoint=None,
    embodiments=None,
    threads: int = 1,
    client_python: str | None = None,
    server: dict | None = None,
) -> dict:
    """{"results": [{robots, route, calls_per_s, windows_calls_per_s, p50_ms, p99_ms, vs_peer}], "config"}."""
    import ray
    from ray import serve

    from deployments.http import start_serve
    from deployments.policy import build_app
    from fleet.embodiments import EMBODIMENTS

    counts = [int(n) for n in robot_counts]
    if not counts or min(counts) < 1 or repeats < 1:
        raise ValueError(f"robot_counts and repeats: expected positive ints, got {robot_counts!r}, {repeats!r}")
    names = list(embodiments or EMBODIMENTS)
    client_python = client_python or sys.executable
    token = secrets.token_urlsafe(16)
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_worker_niceness", "0")  # as serve.py: a niced replica would lose to the peer
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2))
    start_serve(port=None)
    app_name = f"fleet-bench-openpi-{uuid.uuid4().hex[:6]}"
    openpi_port = free_port("127.0.0.1")
    peer_port = free_port("127.0.0.1", {openpi_port})
    config = {
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "num_replicas": 1,
        "threads": threads,
        "max_batch_size": max(64, max(counts)),
        "registry": None,
        "replica_cpus": 1.0,
        "direct": False,
        "openpi_port": openpi_port,
        "auth_token": token,
    } | dict(server or {})
    peer_cmd = [sys.executable, "-m", "fleet.bench.openpi_peer", "--port", str(peer_port), "--threads", str(threads)]
    peer_cmd += ["--token", token] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    peer = subprocess.Popen(peer_cmd, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    results, client, niceness = [], None, None
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-openpi-bench-") as tmp:
            robots = _write_obs(Path(tmp), names, max(counts))
            handle = serve.run(build_app(config), name=app_name, route_prefix=None)
            # the peer runs at the replica's niceness (Ray sets its workers' own): neither gets more of the CPU
            replica_pid = int(str(handle.stats.remote().result()["replica"]).rsplit(":", 1)[1])
            niceness = {"replica": os.getpriority(os.PRIO_PROCESS, replica_pid)}
            with contextlib.suppress(PermissionError):  # lowering it needs CAP_SYS_NICE: then the table says so
                os.setpriority(os.PRIO_PROCESS, peer.pid, niceness["replica"])
            niceness["peer"] = os.getpriority(os.PRIO_PROCESS, peer.pid)
            _wait_http(f"http://127.0.0.1:{openpi_port}/healthz")
            _wait_http(f"http://127.0.0.1:{peer_port}/healthz")
            urls = {"openpi": f"ws://127.0.0.1:{openpi_port}", "peer": f"ws://127.0.0.1:{peer_port}"}
            for n in counts:
                before = handle.stats.remote().result()
                outs, client = _point(n, robots, urls, token, client_python, repeats, seconds_per_point)
                after = handle.stats.remote().result()
                results += _summarize(n, outs, seconds_per_point)
                batches = after["batches"] - before["batches"]
                results[-2]["server_batch"] = (after["rows"] - before["rows"]) / batches if batches else None
    finally:
        peer.terminate()
        peer.wait(timeout=30)
        try:
            serve.delete(app_name)
        finally:
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    cfg = {"seconds_per_point": seconds_per_point, "repeats": repeats, "threads": threads, "client": client}
    cfg["niceness"] = niceness
    return {"results": results, "config": cfg | {"embodiments": names, "cpus": os.cpu_count()}}


def _summarize(n: int, outs: list[dict], seconds: float) -> list[dict]:
    rows = []
    for route in OPENPI_ROUTES:
        windows = [w for w in zip(*(o["windows"] for o in outs), strict=True) if w[0]["route"] == route]
        per_window = [sum(c["calls"] for c in w) / seconds for w in windows]
        lat = np.asarray([x for w in windows for c in w for x in c["latencies_ms"]])
        infer = np.asarray([x for w in windows for c in w for x in c.get("infer_ms", [])], float)
        infer = infer[np.isfinite(infer)]
        rows.append(
            {
                "robots": n,
                "route": route,
                "calls_per_s": float(np.median(per_window)),
                "windows_calls_per_s": per_window,
                "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                # the server's own forward time per call (openpi's server_timing.infer_ms): what is left of the
                # latency is transport, decoding and serving
                "infer_p50_ms": float(np.median(infer)) if infer.size else None,
            }
        )
    rows[0]["vs_peer"] = rows[0]["calls_per_s"] / rows[1]["calls_per_s"] if rows[1]["calls_per_s"] else None
    return rows


def format_openpi_table(result: dict) -> str:
    lines = ["robots  route    calls/s  windows (calls/s)    p50 ms  p99 ms  batch  vs peer"]
    lines.append("-" * len(lines[0]))
    for r in result["results"]:
        ws = r["windows_calls_per_s"]
        # up to four windows fit the column; more show as their range
        windows = " ".join(f"{w:.0f}" for w in ws) if len(ws) <= 4 else f"{len(ws)}: {min(ws):.0f}-{max(ws):.0f}"
        vs = f"{r['vs_peer']:.2f}x" if r.get("vs_peer") is not None else ""
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        batch = f"{r['server_batch']:.1f}" if r.get("server_batch") else "1" if r["route"] == "peer" else "-"
        lines.append(
            f"{r['robots']:>6}  {r['route']:<7} {r['calls_per_s']:>8.1f}  {windows:<19} {p50:>6}  {p99:>6}  "
            f"{batch:>5}  {vs:>7}"
        )
    for n in sorted({r["robots"] for r in result["results"]}):
        parts = [
            f"{r['route']} {r['infer_p50_ms']:.1f}"
            for r in result["results"]
            if r["robots"] == n
            if r.get("infer_p50_ms") is not None
        ]
        if parts:
            lines.append(f"{n:>6} robots, server forward p50 ms: {', '.join(parts)}")
    cfg = result["config"]
    nice = cfg.get("niceness") or {}
    nice = ", ".join(f"{k} {v}" for k, v in nice.items()) or "?"
    lines.append(f"client: {cfg['client']}; torch threads {cfg['threads']} each; nice: {nice}")
    return "\n".join(lines)
