"""Flooding a policy replica's direct socket: clients that pipeline request frames and never read a reply,
while one robot-like client (one request at a time) measures whether it is still served. Used by the chaos
tests, and runnable on its own to measure any version of the code (it needs nothing newer than the frame
format):

    PYTHONPATH=. python tests/chaos/flood.py --seconds 20 --connections 4          # this tree
    PYTHONPATH=/path/to/old/tree python tests/chaos/flood.py --seconds 8 --stop-at-mb 1500

prints one JSON object: frames sent, robot replies and errors, replica RSS before / peak / after (MB).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import numpy as np

HEADER = struct.Struct("!I")


def frame(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def hello_frame(token: str | None) -> bytes:
    return frame({"hello": "fleet-direct/1", "token": token})


def request_wire(robot: str, tick: int) -> dict:
    from fleet.embodiments import EMBODIMENTS
    from fleet.protocol import make_request, request_to_wire

    rng = np.random.default_rng(tick)
    obs = {
        "image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "proprio": rng.standard_normal(EMBODIMENTS["franka"].proprio_dim).astype(np.float32),
        "instruction": "pick up the red cube",
    }
    return request_to_wire(make_request(robot, "franka", obs, obs_tick=tick), binary=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def replica_pid(handle) -> int:
    return int(handle.stats.remote().result(timeout_s=60)["replica"].rsplit(":", 1)[1])


def endpoint_of(handle) -> dict:
    return handle.endpoint.remote().result(timeout_s=60)


def start_policy_app(checkpoint: str, app_name: str, **config):
    """One replica of the policy at `checkpoint` with its direct socket; returns the handle."""
    from ray import serve

    from deployments.policy import build_app

    cfg = {"checkpoint": checkpoint, "num_replicas": 1, "replica_cpus": 0.5, "threads": 1, "registry": None}
    return serve.run(build_app(cfg | config), name=app_name, route_prefix=None)


class Robot(threading.Thread):
    """One request at a time over its own connection, like a robot: counts replies, errors and slow answers."""

    def __init__(self, endpoint: dict, stop: threading.Event, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.stop, self.period_s = endpoint, stop, period_s
        self.replies = self.errors = self.no_answer = 0
        self.latencies: list[float] = []

    def run(self) -> None:
        tick = 0
        sock = None
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection((self.endpoint["host"], self.endpoint["port"]), timeout=2)
                    sock.sendall(hello_frame(token_for(self.endpoint)))
                tick += 1
                sent = time.monotonic()
                sock.sendall(frame(request_wire("robot-ok", tick)))
                reply = _read(sock)
                if reply.get("request_id") == f"robot-ok:{tick}" and "error" not in reply:
                    self.replies += 1
                    self.latencies.append(time.monotonic() - sent)
                else:
                    self.errors += 1
            except TimeoutError:
                self.no_answer += 1
                sock = _close(sock)
            except OSError:
                self.errors += 1
                sock = _close(sock)
            time.sleep(self.period_s)
        _close(sock)


def token_for(endpoint: dict) -> str | None:
    """The token a robot presents to this endpoint: the replica's own secret when it lists one, else the
    fleet's (Ray's) token."""
    if endpoint.get("token"):
        return endpoint["token"]
    try:
        from fleet.serving.direct import fleet_token
    except ImportError:  # a tree from before the token
        return None
    return fleet_token()


def _close(sock):
    if sock is not None:
        sock.close()
    return None


def _read(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    (size,) = HEADER.unpack(exactly(HEADER.size))
    return msgpack.unpackb(exactly(size), raw=False)


def flooder(endpoint: dict, stop: threading.Event, sent: list[int], k: int) -> None:
    """Pipeline frames on one connection and never read (SO_RCVBUF small, as a stuck client's would be)."""
    sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.sendall(hello_frame(token_for(endpoint)))
    data = frame(request_wire(f"flood-{k}", 1))
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            sock.sendall(data)
            sent[k] += 1
        except TimeoutError:
            continue  # the replica stopped reading this connection
        except OSError:
            break  # it hung up
    sock.close()


def flood(handle, connections: int = 4, seconds: float = 20.0, stop_at_mb: float = 3000.0) -> dict:
    """Run `connections` flooders and one robot against the replica behind `handle`; the figures."""
    endpoint, pid = endpoint_of(handle), replica_pid(handle)
    before = rss_mb(pid)
    stop = threading.Event()
    sent = [0] * connections
    robot = Robot(endpoint, stop)
    threads = [
        threading.Thread(target=flooder, args=(endpoint, stop, sent, k), daemon=True) for k in range(connections)
    ]
    robot.start()
    for t in threads:
        t.start()
    peak, started, stopped_early = before, time.monotonic(), False
    while time.monotonic() - started < seconds:
        time.sleep(0.25)
        peak = max(peak, rss_mb(pid))
        if peak > stop_at_mb:
            stopped_early = True
            break
    elapsed = time.monotonic() - started
    stop.set()
    for t in [robot, *threads]:
        t.join(10)
    time.sleep(1.0)
    stats = handle.stats.remote().result(timeout_s=120)
    direct = stats.get("direct") or {}
    lat = sorted(robot.latencies)
    return {
        "connections": connections,
        "seconds": round(elapsed, 1),
        "stopped_early": stopped_early,
        "frames_sent": sum(sent),
        "robot_replies": robot.replies,
        "robot_errors": robot.errors,
        "robot_no_answer": robot.no_answer,
        "robot_p50_ms": round(1e3 * lat[len(lat) // 2], 1) if lat else None,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(rss_mb(pid), 1),
        "refused": direct.get("refused"),
        "direct_requests": direct.get("requests"),
        "replica_pid_after": replica_pid(handle),
        "replica_pid": pid,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--stop-at-mb", type=float, default=3000.0, help="stop the flood once the replica is this big")
    args = parser.parse_args()
    sys.path.insert(0, str(Path.cwd()))
    import ray
    from ray import serve

    from fleet.embodiments import EMBODIMENTS
    from fleet.policy.checkpoint import save_checkpoint
    from fleet.policy.train import build_model
    from tests.mocks.tiny_policy import TINY

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="flood")
    ckpt = Path(f"/tmp/flood-{uuid.uuid4().hex[:6]}") / "policy"
    save_checkpoint(build_model(tuple(EMBODIMENTS)[:4], 0, TINY), ckpt)
    handle = start_policy_app(str(ckpt), "flood")
    handle.act.remote({"bad": 1}).result(timeout_s=120)  # warm
    print(json.dumps(flood(handle, args.connections, args.seconds, args.stop_at_mb)))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
