"""A fleet on a multi-node Ray (ray.cluster_utils.Cluster: a head and two robot nodes): robots spread over both
robot nodes, and when one node is removed its robots come back on the other.

The cluster runs in a subprocess with its own RAY_TMPDIR, so neither this session's Ray nor any other
`ray.init()` on the machine sees it (Cluster records its address in the Ray temp dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, sys, time
import ray
from ray.cluster_utils import Cluster

from fleet.cluster.config import FleetConfig
from fleet.cluster.launcher import down, status, up
from fleet.policy.checkpoint import save_checkpoint
from fleet.policy.train import build_model
from tests.mocks.tiny_policy import TINY

work = sys.argv[1]
save_checkpoint(build_model(("franka", "hello"), 0, TINY), os.path.join(work, "policy"))

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=1, resources={"robot": 4}) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
ids = {n.node_id for n in nodes}

def wait(pred, what, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)

def placed():
    rows = status(namespace="fleet-mn", timeout_s=5)["robots"]
    if all(r.get("node_id") in ids and (r.get("episodes") or 0) >= 1 for r in rows):
        return {r["id"]: r for r in rows}
    return None

config = FleetConfig(robots={"franka": 2, "hello": 2}, checkpoint=os.path.join(work, "policy"), replica_cpus=0.5,
                     realtime=False, namespace="fleet-mn", app_name="fleet-mn-policy",
                     log_dir=os.path.join(work, "log"), robot_resources={"robot": 1}, spread=True,
                     server={"threads": 1, "max_batch_size": 8}, http_port=None, openpi_port=0, metrics_port=0)
up(config)
before = wait(placed, "robots on the robot nodes")
victim = next(n for n in nodes if n.node_id in {r["node_id"] for r in before.values()})
survivor = next(n for n in nodes if n is not victim)
moved = sorted(r["id"] for r in before.values() if r["node_id"] == victim.node_id)
cluster.remove_node(victim)

def relocated():
    rows = placed()
    if rows and all(r["node_id"] == survivor.node_id for r in rows.values()):
        return rows
    return None

after = wait(relocated, "robots back on the surviving node")
result = {
    "robot_nodes": sorted(ids),
    "before": {k: v["node_id"] for k, v in before.items()},
    "after": {k: v["node_id"] for k, v in after.items()},
    "restarted": {k: v["restarted"] for k, v in after.items()},
    "first_tick_held": {k: bool(v["first_tick"] and v["first_tick"]["held"]) for k, v in after.items()},
    "moved": moved,
    "victim": victim.node_id,
    "survivor": survivor.node_id,
}
down(namespace="fleet-mn", stop_cluster=False)
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_robots_spread_over_nodes_and_come_back_when_one_is_removed(tmp_path):
    short = tempfile.mkdtemp(prefix="fmn", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=short, FLEET_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    script = tmp_path / "multinode.py"
    script.write_text(SCRIPT)
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420
        )
    finally:
        shutil.rmtree(short, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert len(set(result["before"].values())) == 2, result  # spread over both robot nodes
    assert result["moved"], result
    assert set(result["after"].values()) == {result["survivor"]}
    for robot_id in result["moved"]:  # the removed node's robots restarted elsewhere, holding first
        assert result["restarted"][robot_id] and result["first_tick_held"][robot_id]
    assert sorted(result["after"]) == ["robot-franka-0", "robot-franka-1", "robot-hello-0", "robot-hello-1"]
