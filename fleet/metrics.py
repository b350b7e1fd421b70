"""The fleet's Prometheus metrics: built on each scrape from the status the controller already aggregates.

    body = render(snapshot)          # snapshot: FleetController.metrics_snapshot() -> Prometheus text format
    server = MetricsServer(scrape, token="s3cret")
    await server.start("127.0.0.1", 8002)         # GET /metrics (Authorization: Bearer <token>), GET /healthz

Why on scrape, not pushed: every number already lives in one place (a robot's report, a replica's stats, the
learner's and the replay store's status), and the controller reaches them all. Building gauges from that on
each scrape keeps one source of truth, costs nothing between scrapes, and a robot that restarts shows its own
counters again (Prometheus' `rate()` handles a counter that starts over). No Ray here: the controller (actors/
controller.py) runs the server on its event loop and supplies the snapshot.

Names (labels): per robot `fleet_robot_*` (robot, embodiment); per replica `fleet_replica_*` (replica, and
embodiment for head versions); `fleet_learner_*`; `fleet_replay_*` (embodiment); `fleet_head_version`.
deployments/grafana/fleet-dashboard.json plots them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192
# a scrape is one small GET; anything larger is refused

# (metric suffix, report key, kind, help) for each robot
ROBOT_METRICS = (
    ("control_hz", "control_hz", "gauge", "Control ticks per second the robot's loop achieves."),
    ("target_hz", "target_hz", "gauge", "The embodiment's control rate."),
    ("episodes", "episodes", "counter", "Episodes finished."),
    ("successes", "successes", "counter", "Episodes that succeeded."),
    ("success_rate", "success_rate", "gauge", "Share of all finished episodes that succeeded."),
    ("recent_success_rate", "recent_success_rate", "gauge", "Share of the last 100 episodes that succeeded."),
    ("interventions", "interventions", "counter", "Chunks a human corrected."),
    ("held_ticks", "held_ticks", "counter", "Ticks the robot held position (no fresh action)."),
    ("ticks", "ticks", "counter", "Control ticks run."),
    ("policy_calls", "policy_calls", "counter", "Requests sent to the policy server."),
    ("failed_calls", "failed_calls", "counter", "Policy requests that failed."),
    ("head_version", "head_version", "gauge", "Head version of the robot's last chunk."),
)


def _num(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def _family(kind: str, name: str, doc: str, labels: list[str]) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(name, doc, labels=labels)


def _robot_families(robots: list[dict]) -> Iterable[Metric]:
    labels = ["robot", "embodiment"]
    for suffix, key, kind, doc in ROBOT_METRICS:
        fam = _family(kind, f"fleet_robot_{suffix}", doc, labels)
        for r in robots:
            if (v := _num(r.get(key))) is not None:
                fam.add_metric([r["id"], r.get("embodiment") or ""], v)
        yield fam
    up = GaugeMetricFamily(
        "fleet_robot_up", "1 while the robot answers status, 0 restarting or unreachable.", labels=labels
    )
    estops = CounterMetricFamily("fleet_robot_estops", "Force e-stop trips (safety layer).", labels=labels)
    latched = GaugeMetricFamily("fleet_robot_estop_latched", "1 while the force e-stop is latched.", labels=labels)
    latency = GaugeMetricFamily(
        "fleet_robot_policy_latency_ms", "Policy round trip seen by the robot.", labels=[*labels, "quantile"]
    )
    for r in robots:
        lv = [r["id"], r.get("embodiment") or ""]
        up.add_metric(lv, 0.0 if r.get("state") in ("restarting", "unreachable", "lost") else 1.0)
        if (v := _num((r.get("safety") or {}).get("estop_trips"))) is not None:
            estops.add_metric(lv, v)
        if (v := _num(r.get("estop_latched"))) is not None:
            latched.add_metric(lv, v)
        for q, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
            if (v := _num(r.get(key))) is not None:
                latency.add_metric([*lv, q], v)
    yield from (up, estops, latched, latency)


def _replica_families(replicas: list[dict]) -> Iterable[Metric]:
    lab = ["replica"]
    fams = {
        "mean_batch_size": GaugeMetricFamily(
            "fleet_replica_mean_batch_size", "Mean rows per forward pass.", labels=lab
        ),
        "queue_depth": GaugeMetricFamily(
            "fleet_replica_queue_depth", "Requests waiting for the next batch.", labels=lab
        ),
        "requests": CounterMetricFamily("fleet_replica_requests", "Act requests answered.", labels=lab),
        "batches": CounterMetricFamily("fleet_replica_batches", "Forward passes run.", labels=lab),
        "rejected": CounterMetricFamily("fleet_replica_rejected", "Malformed requests refused.", labels=lab),
        "head_swaps": CounterMetricFamily("fleet_replica_head_swaps", "Head versions installed.", labels=lab),
    }
    forward = GaugeMetricFamily(
        "fleet_replica_forward_ms", "Forward pass time over the last 2048 batches.", labels=["replica", "quantile"]
    )
    heads = GaugeMetricFamily(
        "fleet_replica_head_version", "Head version a replica serves.", labels=["replica", "embodiment"]
    )
    openpi = GaugeMetricFamily("fleet_replica_openpi_connections", "Open openpi websocket connections.", labels=lab)
    for rep in replicas:
        rid = str(rep.get("replica"))
        for key, fam in fams.items():
            if (v := _num(rep.get(key))) is not None:
                fam.add_metric([rid], v)
        for q, key in (("0.5", "infer_ms_p50"), ("0.9", "infer_ms_p90"), ("0.99", "infer_ms_p99")):
            if (v := _num(rep.get(key))) is not None:
                forward.add_metric([rid, q], v)
        for name, version in sorted((rep.get("head_versions") or {}).items()):
            if (v := _num(version)) is not None:
                heads.add_metric([rid, name], v)
        if isinstance(rep.get("openpi"), dict) and (v := _num(rep["openpi"].get("connections"))) is not None:
            openpi.add_metric([rid], v)
    yield from (*fams.values(), forward, heads, openpi)


def _learner_families(learner: dict | None) -> Iterable[Metric]:
    if not learner:
        return
    rounds, published = _num(learner.get("rounds")), _num(learner.get("published"))
    for name, value, doc in (
        ("rounds", rounds, "Adaptation rounds run."),
        ("published", published, "Rounds whose head was published."),
        ("refused", None if rounds is None or published is None else rounds - published, "Rounds not published."),
        ("rolled_back", _num(learner.get("rollbacks")), "Published heads rolled back after a success drop."),
    ):
        if value is not None:
            fam = CounterMetricFamily(f"fleet_learner_{name}", doc)
            fam.add_metric([], value)
            yield fam
    up = GaugeMetricFamily("fleet_learner_up", "1 while the learner answers status.")
    up.add_metric([], 0.0 if learner.get("state") == "unreachable" else 1.0)
    yield up


def _replay_families(replay: dict | None) -> Iterable[Metric]:
    if not replay or "error" in replay:
        return
    stored = CounterMetricFamily(
        "fleet_replay_corrections_stored",
        "Corrections durably stored since the replay actor started.",
        labels=["embodiment"],
    )
    for name, n in sorted((replay.get("accepted") or {}).items()):
        stored.add_metric([name], float(n))
    buffered = GaugeMetricFamily(
        "fleet_replay_buffered", "Corrections held in memory for sampling.", labels=["embodiment"]
    )
    for name, b in sorted(((replay.get("buffer") or {}).get("embodiments") or {}).items()):
        buffered.add_metric([name], float(b.get("count", 0)))
    rejected = CounterMetricFamily("fleet_replay_rejected", "Corrections refused as malformed.")
    rejected.add_metric([], float(replay.get("rejected_total") or 0))
    log_bytes = GaugeMetricFamily("fleet_replay_log_bytes", "Size of the durable Parquet log.")
    log_bytes.add_metric([], float((replay.get("log") or {}).get("bytes") or 0))
    yield from (stored, buffered, rejected, log_bytes)


class _Snapshot:
    """A prometheus_client collector over one snapshot dict."""

    def __init__(self, snapshot: dict) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        yield from _robot_families(s.get("robots") or [])
        yield from _replica_families(s.get("replicas") or [])
        yield from _learner_families(s.get("learner"))
        yield from _replay_families(s.get("replay"))
        heads = GaugeMetricFamily("fleet_head_version", "Head version the policy server serves.", labels=["embodiment"])
        for name, version in sorted((s.get("heads") or {}).items()):
            if (v := _num(version)) is not None:
                heads.add_metric([name], v)
        desired = GaugeMetricFamily("fleet_robots_desired", "Robots wanted per embodiment.", labels=["embodiment"])
        for name, n in sorted((s.get("desired") or {}).items()):
            desired.add_metric([name], float(n))
        yield from (heads, desired)


def render(snapshot: dict) -> bytes:
    """The Prometheus text exposition of one snapshot {"robots", "replicas", "learner", "replay", "heads", ...}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(snapshot))
    return generate_latest(registry)


class MetricsServer:
    """GET /metrics (the token as `Authorization: Bearer <token>` when set) and GET /healthz, on asyncio."""

    def __init__(self, scrape: Callable[[], Awaitable[bytes]], token: str | None = None) -> None:
        self._scrape = scrape
        self._token = token.encode() if token else None
        self._server: asyncio.base_events.Server | None = None
        self.host: str | None = None
        self.port: int | None = None
        self.counts = {"scrapes": 0, "refused": 0, "errors": 0}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self.host, self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, ctype = await asyncio.wait_for(self._answer(reader), 30.0)
        except (TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            status, body, ctype = 400, b"bad request\n", "text/plain"
        except Exception as exc:  # noqa: BLE001 - a scrape never takes the controller down
            self.counts["errors"] += 1
            log.exception("metrics scrape failed")
            status, body, ctype = 500, f"internal: {type(exc).__name__}: {exc}\n".encode(), "text/plain"
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Error"}.get(status, "")
        head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        if status == 401:
            head += 'WWW-Authenticate: Bearer realm="fleet"\r\n'
        with contextlib.suppress(ConnectionError):
            writer.write((head + "Connection: close\r\n\r\n").encode() + body)
            await writer.drain()
        writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return 400, b"expected GET /metrics\n", "text/plain"
        path = parts[1].split("?", 1)[0]
        if path == "/healthz":
            return 200, b"OK\n", "text/plain"
        if path != "/metrics":
            return 404, b"not found: GET /metrics\n", "text/plain"
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if self._token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                self.counts["refused"] += 1
                return 401, b"authorization: missing or wrong bearer token\n", "text/plain"
        self.counts["scrapes"] += 1
        return 200, await self._scrape(), CONTENT_TYPE
