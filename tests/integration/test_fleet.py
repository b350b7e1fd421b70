"""The fleet lifecycle on a real local Ray: up, robots that report, status from another process, scale up and
down (a removed robot's corrections reach the replay store), a killed robot that comes back holding, robots
that stay light, and holding when the server is gone. One tiny untrained policy serves every test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleet.cluster.config import FleetConfig
from fleet.embodiments import EMBODIMENTS
from tests.mocks.tiny_policy import TINY

pytestmark = pytest.mark.ray

STATUS_KEYS = {"id", "embodiment", "state", "control_hz", "episodes", "success_rate", "interventions"}
STATUS_KEYS |= {"head_version", "latency_p50_ms", "latency_p99_ms"}
TOKEN = "fleet-test-" + uuid.uuid4().hex[:8]


def wait_for(predicate, timeout_s: float = 120.0, every_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


@pytest.fixture(scope="module")
def fleet(ray_session, tmp_path_factory):
    """A sim-mode fleet of 3 robots (franka x2, hello x1) on a tiny policy, in a private namespace."""
    from fleet.cluster.launcher import down, up
    from fleet.policy.checkpoint import save_checkpoint
    from fleet.policy.train import build_model

    root = tmp_path_factory.mktemp("fleet")
    os.environ["FLEET_STATE_DIR"] = str(root / "state")  # never touch a real `fleet up` on this machine
    save_checkpoint(build_model(tuple(EMBODIMENTS), 0, TINY), root / "policy")
    tag = uuid.uuid4().hex[:6]
    config = FleetConfig(
        robots={"franka": 2, "hello": 1},
        checkpoint=str(root / "policy"),
        replica_cpus=0.5,
        realtime=False,
        namespace=f"fleet-test-{tag}",
        app_name=f"fleet-policy-{tag}",
        log_dir=str(root / "log"),
        server={"threads": 1, "max_batch_size": 16},
        http_port=0,  # any free ports: the defaults (8000-8002) may be taken on a shared machine
        openpi_port=0,
        metrics_port=0,
        api_token=TOKEN,
    )
    info = up(config)
    yield config, info
    down(namespace=config.namespace, stop_cluster=False)


def robot(ray, config, name):
    return ray.get_actor(name, namespace=config.namespace)


def test_up_brings_up_robots_that_report(fleet):
    from fleet.cluster.launcher import status

    config, info = fleet
    assert sorted(info["robots"]) == ["robot-franka-0", "robot-franka-1", "robot-hello-0"]
    s = wait_for(
        lambda: (
            (s := status(namespace=config.namespace))
            and all((r["episodes"] or 0) >= 2 and r.get("direct_calls", 0) > 0 for r in s["robots"])
            and s
        ),
        what="every robot to finish two episodes, asking over the direct route",
    )
    assert s["heads"] == dict.fromkeys(EMBODIMENTS, 1)
    for row in s["robots"]:
        assert STATUS_KEYS <= set(row)
        assert row["state"] in ("normal", "human", "paused", "conservative", "holding", "estop")
        assert row["control_hz"] > 0 and row["head_version"] == 1 and row["latency_p50_ms"] > 0
        assert row["interventions"] > 0  # the untrained policy strays; the scripted human corrects it
        assert row["loop_errors"] == 0 and row["mode"] == "sim"  # metrics and sink work in the control thread
    later = status(namespace=config.namespace)
    assert sum(r["episodes"] for r in later["robots"]) >= sum(r["episodes"] for r in s["robots"])


def test_robot_actors_stay_light(ray_session, fleet):
    config, _ = fleet
    report = ray_session.get(robot(ray_session, config, "robot-franka-0").report.remote())
    assert report["torch_loaded"] is False
    assert report["pyarrow_loaded"] is False  # Ray would import it into every worker (actors/lean.py)
    assert report["rss_mb"] <= 150, f"robot actor RSS {report['rss_mb']:.0f} MB"


def test_status_from_another_process(ray_session, fleet):
    config, _ = fleet
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "fleet.cli", "status", "--json", "--address", address]
    out = subprocess.run(cmd + ["--namespace", config.namespace], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout)
    assert {r["id"] for r in status["robots"]} >= {"robot-franka-0", "robot-hello-0"}
    assert all(STATUS_KEYS <= set(r) for r in status["robots"])
    assert status["heads"] == dict.fromkeys(EMBODIMENTS, 1)
    missing = subprocess.run(
        cmd + ["--namespace", "no-such-fleet"], capture_output=True, text=True, timeout=120
    )  # a clear error, not a traceback
    assert missing.returncode == 2 and "no fleet is running" in missing.stderr


def test_scale_up_and_down_hands_corrections_to_the_replay_store(ray_session, fleet):
    from fleet.cluster.launcher import REPLAY, scale, status

    ray = ray_session
    config, _ = fleet
    out = scale({"franka": 1, "leap": 1}, namespace=config.namespace)
    assert out["added"] == ["robot-leap-0"] and out["robots"]["franka"] == 1
    (final,) = out["removed"]
    assert final["id"] == "robot-franka-1" and final["state"] == "stopped" and final["corrections_delivered"]
    assert final["corrections_acked"] == final["corrections_sent"] == final["interventions"] > 0
    replay = ray.get_actor(REPLAY, namespace=config.namespace)
    stored = ray.get(replay.since.remote("franka", 0))["corrections"]
    assert sum(c.robot_id == "robot-franka-1" for c in stored) == final["corrections_acked"]
    with pytest.raises(ValueError):
        ray.get_actor("robot-franka-1", namespace=config.namespace)
    ids = {r["id"] for r in status(namespace=config.namespace)["robots"]}
    assert ids == {"robot-franka-0", "robot-hello-0", "robot-leap-0"}


def test_killed_robot_comes_back_in_a_safe_state(ray_session, fleet):
    ray = ray_session
    config, _ = fleet
    handle = robot(ray, config, "robot-hello-0")
    before = ray.get(handle.report.remote())
    assert before["restarted"] is False
    ray.kill(handle, no_restart=False)

    def back():
        try:
            r = ray.get(handle.report.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return None  # dead, not yet restarted
        return r if r["pid"] != before["pid"] and r["first_tick"] else None

    after = wait_for(back, what="the robot to restart")
    assert after["restarted"] is True  # a fresh incarnation: new process, new env episode, new safety layer
    first = after["first_tick"]
    assert first["held"] and "startup" in first["fired"]
    np.testing.assert_array_equal(first["sent"], EMBODIMENTS["hello"].stop_action)  # the base stands still
    assert after["safety"]["estop_trips"] == 0
    wait_for(lambda: ray.get(handle.report.remote())["episodes"] >= 1, what="the restarted robot to drive")


def test_a_latched_estop_survives_a_restart_until_an_operator_resets_it(ray_session, fleet):
    """The latch is written to the robot's state file; a restarted robot comes back latched and holds, however
    long, until `reset_estop` (what `fleet estop reset` calls); the reset is written too."""
    from fleet.cluster.launcher import FleetError, reset_estop

    ray = ray_session
    config, _ = fleet
    name = "robot-franka-0"
    latch = Path(config.log_dir).resolve() / "robots" / f"{name}.estop.json"
    latch.parent.mkdir(parents=True, exist_ok=True)
    latch.write_text(json.dumps({"robot_id": name, "latched": True}))  # as the control thread writes a trip
    handle = robot(ray, config, name)
    before = ray.get(handle.report.remote())
    ray.kill(handle, no_restart=False)

    def back():
        try:
            r = ray.get(handle.report.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return None
        return r if r["pid"] != before["pid"] and r["ticks"] > 20 else None

    after = wait_for(back, what="the robot to restart and tick")
    assert after["estop_latched"] is True and after["state"] == "estop"
    moved = ray.get(handle.report.remote())["held_ticks"]
    time.sleep(1.0)
    later = ray.get(handle.report.remote())
    assert later["estop_latched"] is True and later["held_ticks"] > moved  # still holding, every tick
    assert reset_estop(name, namespace=config.namespace) == {"robot": name, "was_latched": True}
    assert json.loads(latch.read_text())["latched"] is False
    wait_for(lambda: ray.get(handle.report.remote())["state"] != "estop", what="the robot to leave the e-stop")
    assert reset_estop(name, namespace=config.namespace)["was_latched"] is False
    with pytest.raises(FleetError, match="robot: expected one of"):
        reset_estop("robot-nope-0", namespace=config.namespace)


def test_robots_hold_when_the_server_is_gone_and_the_handle_route_works(ray_session, fleet):
    from actors.robot import RobotActor

    ray = ray_session
    config, _ = fleet
    common = {"realtime": True, "teleop": False}
    lost = RobotActor.remote(
        {"robot_id": "lost-0", "embodiment": "franka"} | common,
        policy={"route": "gateway", "app": "no-such-app", "namespace": config.namespace},
    )
    direct = RobotActor.remote(
        {"robot_id": "direct-0", "embodiment": "hello"} | common,
        policy={"route": "handle", "app": config.app_name},
    )
    try:
        # the first request may time out while this node's gateway starts; then every call fails at once
        r = wait_for(lambda: (r := ray.get(lost.report.remote())) and r["policy_link"] == "down" and r, what="down")
        assert r["state"] == "holding" and r["policy_calls"] == 0 and r["ticks"] > 0
        assert r["held_ticks"] == r["ticks"] and "policy request failed" in r["last_error"]
        d = wait_for(lambda: (d := ray.get(direct.report.remote())) and d["policy_calls"] >= 5 and d, what="replies")
        assert d["head_version"] == 1 and d["failed_calls"] == 0
        final = ray.get(direct.stop.remote(finish_episode=False))
        assert final["state"] == "stopped"
    finally:
        for handle in (lost, direct):
            ray.kill(handle, no_restart=True)


# ---- the endpoints `fleet up` serves outside Ray ----------------------------------------------------------
def _scrape(url: str, token: str | None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple, float]:
    """{(name, ((label, value), ...) sorted): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }


def test_metrics_endpoint_that_status_names_has_plausible_values(fleet):
    from fleet.cluster.launcher import status

    config, info = fleet
    done = lambda: (s := status(namespace=config.namespace)) and all((r["episodes"] or 0) >= 1 for r in s["robots"])  # noqa: E731
    wait_for(done, what="an episode of every robot")
    endpoints = status(namespace=config.namespace)["endpoints"]
    assert endpoints == info["endpoints"] and all(endpoints.values())
    assert endpoints["metrics"].startswith("http://127.0.0.1:") and endpoints["metrics"].endswith("/metrics")
    assert _scrape(endpoints["metrics"], None)[0] == 401 and _scrape(endpoints["metrics"], "wrong")[0] == 401
    code, text = _scrape(endpoints["metrics"], TOKEN)
    assert code == 200, text
    m = _samples(text)

    def robot(name: str, **extra) -> float:
        return m[(name, tuple(sorted({"robot": "robot-franka-0", "embodiment": "franka", **extra}.items())))]

    def any_of(name: str, **labels) -> list[float]:
        return [v for (n, lab), v in m.items() if n == name and set(labels.items()) <= set(lab)]

    assert robot("fleet_robot_episodes_total") >= 1 and robot("fleet_robot_up") == 1
    assert robot("fleet_robot_control_hz") > 0 and robot("fleet_robot_interventions_total") > 0
    assert 0 <= robot("fleet_robot_success_rate") <= 1 and robot("fleet_robot_head_version") == 1
    assert robot("fleet_robot_policy_latency_ms", quantile="0.5") > 0
    assert robot("fleet_robot_ticks_total") >= robot("fleet_robot_held_ticks_total") >= 0
    assert robot("fleet_robot_estops_total") >= 0 and robot("fleet_robot_estop_latched") in (0, 1)
    batch = any_of("fleet_replica_mean_batch_size")
    assert len(batch) == 1 and batch[0] >= 1  # one replica, found through the registry
    assert any_of("fleet_replica_forward_ms", quantile="0.5")[0] > 0
    assert any_of("fleet_replica_queue_depth")[0] >= 0 and any_of("fleet_replica_requests_total")[0] > 0
    assert any_of("fleet_replica_head_version", embodiment="hello") == [1]
    assert any_of("fleet_head_version", embodiment="franka") == [1]
    assert any_of("fleet_replay_corrections_stored_total", embodiment="franka")[0] > 0


def test_openpi_and_http_endpoints_reach_the_fleets_replica(ray_session, fleet):
    """A robot outside Ray: openpi's framing (the unit tests' client) and the HTTP ingress, both answered by the
    fleet's own PolicyServer replica (its openpi counter moves; the head version is the fleet's)."""
    import httpx

    from fleet.protocol import make_request, request_to_wire
    from fleet.sim import make_env
    from tests.unit.serving.test_openpi import Client

    config, info = fleet
    obs, _ = make_env("franka", seed=3).reset(seed=3)
    client = Client(info["endpoints"]["openpi"] + "/franka", api_key=TOKEN)
    assert client.metadata["embodiments"]["franka"]["head_version"] == 1
    reply = client.infer(
        {"observation/image": obs["image"], "observation/state": obs["proprio"], "prompt": obs["instruction"]}
    )
    client.close()
    assert reply["actions"].shape == (16, 7) and reply["actions"].dtype == np.float32
    assert np.isfinite(reply["actions"]).all() and reply["head_version"] == 1 and reply["server_timing"]["infer_ms"] > 0
    from ray import serve

    stats = serve.get_app_handle(config.app_name).stats.remote().result(timeout_s=60)
    assert stats["openpi"]["requests"] >= 1 and stats["openpi"]["errors"] == 0

    body = request_to_wire(make_request("outside-0", "hello", make_env("hello", seed=1).reset(seed=1)[0]))
    url = info["endpoints"]["http"] + "/v1/act"
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert np.asarray(ok.json()["chunk"]).shape == (16, 3) and ok.json()["head_version"] == 1


def test_an_unmodified_openpi_client_drives_a_robot(fleet):
    """openpi-client 0.1.2 itself (WebsocketClientPolicy + ActionChunkBroker), from its own venv (it pins numpy < 2):
    FLEET_OPENPI_PYTHON names that venv's python (with gymnasium for the sim; see fleet/serving/openpi_drive.py)."""
    python = os.environ.get("FLEET_OPENPI_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("set FLEET_OPENPI_PYTHON to a python with openpi-client and gymnasium (not installable here)")
    _, info = fleet
    repo = Path(__file__).resolve().parents[2]
    cmd = [python, "-m", "fleet.serving.openpi_drive", info["endpoints"]["openpi"] + "/hello", "--token", TOKEN]
    run = subprocess.run(
        cmd + ["--episodes", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["client"] == "openpi-client" and out["server"] == {"server": "vla-fleet", "protocol": "openpi-websocket"}
    assert out["head_version"] == 1 and out["server_calls"] >= 1 and out["episodes"][0]["steps"] > 0
