"""fleet/metrics.py without Ray: the exposition built from a status snapshot, and the small HTTP server."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from fleet.metrics import MetricsServer, render

SNAPSHOT = {
    "robots": [
        {
            "id": "robot-franka-0",
            "embodiment": "franka",
            "state": "normal",
            "control_hz": 10.0,
            "episodes": 4,
            "successes": 3,
            "success_rate": 0.75,
            "recent_success_rate": 0.5,
            "interventions": 7,
            "held_ticks": 2,
            "ticks": 400,
            "head_version": 2,
            "latency_p50_ms": 12.5,
            "latency_p99_ms": 30.0,
            "safety": {"estop_trips": 1},
            "estop_latched": True,
        },
        {"id": "robot-hello-0", "embodiment": "hello", "state": "restarting", "episodes": None},
    ],
    "replicas": [
        {
            "replica": "r1:42",
            "mean_batch_size": 3.5,
            "queue_depth": 0,
            "requests": 90,
            "batches": 30,
            "infer_ms_p50": 8.0,
            "infer_ms_p99": 20.0,
            "head_versions": {"franka": 2, "hello": 1},
            "openpi": {"connections": 1},
        },
    ],  # fmt: skip
    "learner": {"state": "idle", "rounds": 5, "published": 3, "rollbacks": 1},
    "replay": {
        "accepted": {"franka": 7},
        "buffer": {"embodiments": {"franka": {"count": 7}}},
        "rejected_total": 0,
        "log": {"bytes": 1234},
    },  # fmt: skip
    "heads": {"franka": 2, "hello": 1},
    "desired": {"franka": 1, "hello": 1},
}


def samples(body: bytes) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render_carries_every_part_of_the_snapshot():
    m = samples(render(SNAPSHOT))
    franka = (("embodiment", "franka"), ("robot", "robot-franka-0"))
    hello = (("embodiment", "hello"), ("robot", "robot-hello-0"))
    assert m[("fleet_robot_episodes_total", franka)] == 4 and m[("fleet_robot_success_rate", franka)] == 0.75
    assert m[("fleet_robot_control_hz", franka)] == 10 and m[("fleet_robot_interventions_total", franka)] == 7
    assert m[("fleet_robot_estops_total", franka)] == 1 and m[("fleet_robot_estop_latched", franka)] == 1
    assert m[("fleet_robot_held_ticks_total", franka)] == 2
    assert m[("fleet_robot_policy_latency_ms", (franka[0], ("quantile", "0.99"), franka[1]))] == 30
    assert m[("fleet_robot_up", franka)] == 1 and m[("fleet_robot_up", hello)] == 0
    assert ("fleet_robot_episodes_total", hello) not in m  # unknown is absent, never a made-up 0
    assert m[("fleet_replica_mean_batch_size", (("replica", "r1:42"),))] == 3.5
    assert m[("fleet_replica_forward_ms", (("quantile", "0.5"), ("replica", "r1:42")))] == 8
    assert m[("fleet_replica_head_version", (("embodiment", "franka"), ("replica", "r1:42")))] == 2
    assert m[("fleet_replica_queue_depth", (("replica", "r1:42"),))] == 0
    assert m[("fleet_learner_refused_total", ())] == 2 and m[("fleet_learner_rolled_back_total", ())] == 1
    assert m[("fleet_replay_corrections_stored_total", (("embodiment", "franka"),))] == 7
    assert m[("fleet_head_version", (("embodiment", "hello"),))] == 1


def test_server_wants_the_token_and_answers_healthz():
    async def scenario():
        server = MetricsServer(lambda: _body(), token="t0k")
        host, port = await server.start("127.0.0.1", 0)

        async def get(path: str, auth: str | None) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            head = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + (f"Authorization: {auth}\r\n" if auth else "") + "\r\n"
            writer.write(head.encode())
            data = await reader.read()
            writer.close()
            return data

        out = [await get("/metrics", None), await get("/metrics", "Bearer nope"), await get("/metrics", "Bearer t0k")]
        out += [await get("/healthz", None), await get("/other", "Bearer t0k")]
        await server.close()
        return out, server.counts

    async def _body() -> bytes:
        return render(SNAPSHOT)

    (none, wrong, ok, health, other), counts = asyncio.run(scenario())
    assert none.startswith(b"HTTP/1.1 401") and wrong.startswith(b"HTTP/1.1 401")
    assert ok.startswith(b"HTTP/1.1 200") and b"fleet_robot_episodes_total" in ok
    assert health.startswith(b"HTTP/1.1 200") and other.startswith(b"HTTP/1.1 404")
    assert counts == {"scrapes": 1, "refused": 2, "errors": 0}


def test_grafana_dashboard_plots_metrics_the_fleet_exports():
    """Every metric a panel of deployments/grafana/fleet-dashboard.json queries is one render() produces."""
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[2] / "deployments/grafana/fleet-dashboard.json").read_text())
    exported = {name for name, _ in samples(render(SNAPSHOT))}
    queried = {
        name
        for panel in dash["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\bfleet_[a-z_]+", target["expr"])
    }
    assert len(queried) >= 15 and queried <= exported, queried - exported
    assert {p["type"] for p in dash["panels"]} == {"row", "timeseries"} and dash["__inputs"][0][
        "pluginId"
    ] == "prometheus"
