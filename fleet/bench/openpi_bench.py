"""`fleet bench serve --route openpi,peer`: our openpi endpoint against openpi's own server design, same clients.

    fleet bench serve --route openpi,peer --robots 1,4,16 --seconds 5 --repeats 3 --client-python /tmp/openpi/bin/python

Two servers run side by side on the same model and torch threads: a fleet PolicyServer replica with its openpi
endpoint (fleet/serving/openpi.py: requests join the replica's batches) and the peer (fleet/bench/openpi_peer.py:
openpi's WebsocketPolicyServer design, `infer` inline per request, no batching). For each robot count N, N client
processes (fleet/bench/openpi_load.py; openpi-client's `WebsocketClientPolicy` when --client-python names a python
that has it) connect to both, then follow one schedule of alternating windows (openpi, peer, peer, openpi, ...:
drift on a shared machine hits both alike), each a closed loop of `infer` calls on the same recorded simulator
observations. Reported per N and route: the median over windows of calls/s, and latency percentiles over all calls;
per N, the openpi/peer ratio of each adjacent pair of windows (median and a bootstrap 95 % interval). With
--restarts K both servers start afresh K times and the windows are pooled: a process keeps the speed it starts with
(a few percent either way on a shared VM), so one start can favour either side.
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
    restarts: int = 1,
) -> dict:
    """{"results": [{robots, route, calls_per_s, windows_calls_per_s, p50_ms, p99_ms, vs_peer, paired}], "config"}.

    restarts: how many times both servers are started afresh (the whole schedule runs on each pair). A
    process's speed on this kind of machine varies by a few percent from one start to the next and stays there
    (where its memory lands), so one pair of processes can favour either side; the windows of every restart
    are pooled."""
    import ray
    from ray import serve

    from deployments.http import start_serve
    from fleet.embodiments import EMBODIMENTS

    counts = [int(n) for n in robot_counts]
    if not counts or min(counts) < 1 or repeats < 1 or restarts < 1:
        raise ValueError(
            f"robot_counts, repeats and restarts: expected positive ints, got {robot_counts!r}, {repeats!r}, "
            f"{restarts!r}"
        )
    names = list(embodiments or EMBODIMENTS)
    client_python = client_python or sys.executable
    token = secrets.token_urlsafe(16)
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_worker_niceness", "0")  # as serve.py: a niced replica would lose to the peer
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2))
    start_serve(port=None)
    outs: dict[int, list[list[dict]]] = {n: [] for n in counts}  # per count: per restart, the clients' outputs
    batches: dict[int, list[float]] = {n: [] for n in counts}
    client, niceness = None, None
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-openpi-bench-") as tmp:
            robots = _write_obs(Path(tmp), names, max(counts))
            for _ in range(restarts):
                with _servers(checkpoint, threads, counts, token, server) as (handle, urls, niceness):
                    for n in counts:
                        before = handle.stats.remote().result()
                        point, client = _point(n, robots, urls, token, client_python, repeats, seconds_per_point)
                        after = handle.stats.remote().result()
                        outs[n].append(point)
                        if after["batches"] > before["batches"]:
                            rows = after["rows"] - before["rows"]
                            batches[n].append(rows / (after["batches"] - before["batches"]))
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    results = []
    for n in counts:
        # client i's windows, restart after restart: pairs stay adjacent (each restart's schedule is whole pairs)
        pooled = [{"windows": [w for run in outs[n] for w in run[i]["windows"]]} for i in range(n)]
        results += _summarize(n, pooled, seconds_per_point)
        results[-2]["server_batch"] = float(np.mean(batches[n])) if batches[n] else None
    cfg = {"seconds_per_point": seconds_per_point, "repeats": repeats, "restarts": restarts, "threads": threads}
    cfg |= {"client": client, "niceness": niceness}
    return {"results": results, "config": cfg | {"embodiments": names, "cpus": os.cpu_count()}}


@contextlib.contextmanager
def _servers(checkpoint, threads: int, counts: list[int], token: str, server: dict | None):
    """A fresh pair: a fleet PolicyServer replica with its openpi endpoint, and the peer process, both ready.
    Yields (the replica's handle, {"openpi": url, "peer": url}, their niceness)."""
    from ray import serve

    from deployments.policy import build_app

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
    try:
        handle = serve.run(build_app(config), name=app_name, route_prefix=None)
        try:
            # the peer runs at the replica's niceness (Ray sets its workers' own): neither gets more of the CPU
            replica_pid = int(str(handle.stats.remote().result()["replica"]).rsplit(":", 1)[1])
            niceness = {"replica": os.getpriority(os.PRIO_PROCESS, replica_pid)}
            with contextlib.suppress(PermissionError):  # lowering it needs CAP_SYS_NICE: then the table says so
                os.setpriority(os.PRIO_PROCESS, peer.pid, niceness["replica"])
            niceness["peer"] = os.getpriority(os.PRIO_PROCESS, peer.pid)
            _wait_http(f"http://127.0.0.1:{openpi_port}/healthz")
            _wait_http(f"http://127.0.0.1:{peer_port}/healthz")
            yield handle, {"openpi": f"ws://127.0.0.1:{openpi_port}", "peer": f"ws://127.0.0.1:{peer_port}"}, niceness
        finally:
            serve.delete(app_name)
    finally:
        peer.terminate()
        peer.wait(timeout=30)


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
    rows[0]["paired"] = paired_ratio(
        [sum(c["calls"] for c in w) for w in zip(*(o["windows"] for o in outs), strict=True)],
        [w["route"] for w in outs[0]["windows"]],
    )
    return rows


def paired_ratio(calls: list[int], routes: list[str], seed: int = 0) -> dict | None:
    """openpi / peer calls for each pair of adjacent windows (the ABBA schedule puts one of each in every
    pair, so drift of the shared machine cancels within a pair): their median and a bootstrap 95 % interval
    of that median over the pairs. None with fewer than 2 pairs."""
    ratios = []
    for k in range(0, len(calls) - 1, 2):
        by_route = dict(zip(routes[k : k + 2], calls[k : k + 2], strict=True))
        if set(by_route) == set(OPENPI_ROUTES) and by_route["peer"] > 0:
            ratios.append(by_route["openpi"] / by_route["peer"])
    if len(ratios) < 2:
        return None
    r = np.asarray(ratios)
    boot = np.median(np.random.default_rng(seed).choice(r, (2000, r.size)), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"pairs": int(r.size), "median": float(np.median(r)), "ci95": [float(lo), float(hi)], "ratios": ratios}


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
        paired = next((r.get("paired") for r in result["results"] if r["robots"] == n and r.get("paired")), None)
        if paired:
            lo, hi = paired["ci95"]
            lines.append(
                f"{n:>6} robots, openpi/peer per window pair: median {paired['median']:.2f}x "
                f"(95% CI {lo:.2f}-{hi:.2f}, {paired['pairs']} pairs)"
            )
    cfg = result["config"]
    nice = cfg.get("niceness") or {}
    nice = ", ".join(f"{k} {v}" for k, v in nice.items()) or "?"
    runs = f"; {cfg['restarts']} server starts" if cfg.get("restarts", 1) > 1 else ""
    lines.append(f"client: {cfg['client']}; torch threads {cfg['threads']} each; nice: {nice}{runs}")
    return "\n".join(lines)
