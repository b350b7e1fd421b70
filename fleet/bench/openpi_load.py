"""One robot of `fleet bench serve --route openpi,peer`: a closed loop of openpi `infer` calls, one process each.

Run by the bench, with openpi-client's python where one is given (then the client IS openpi-client's
`WebsocketClientPolicy`), else with this venv's (then a client that frames exactly as it does). It connects to
every URL it is given, prints "ready", reads one JSON line from stdin: the schedule [{"route", "start", "end",
"measure_from"}, ...] in time.time() seconds, and for each window calls that route back to back from `start` to
`end`, counting the calls that begin after `measure_from`. Prints one JSON line: the client it used and
{"calls", "latencies_ms", "infer_ms"} per window (infer_ms: the server_timing each reply carries).

    python -m fleet.bench.openpi_load --obs robot-3.npz --url openpi=ws://127.0.0.1:8001/franka ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _client(url: str, token: str | None):
    try:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy
    except ImportError:
        return _FramingClient(url, token), "fleet openpi-framing client"
    from importlib.metadata import version

    return WebsocketClientPolicy(url, api_key=token), f"openpi-client {version('openpi-client')}"


class _FramingClient:
    """openpi-client's WebsocketClientPolicy, re-stated (numpy over msgpack as fleet/serving/openpi_wire.py)."""

    def __init__(self, url: str, token: str | None) -> None:
        from websockets.sync.client import connect

        from fleet.serving import openpi_wire

        self._wire = openpi_wire
        headers = {"Authorization": f"Api-Key {token}"} if token else None
        self._ws = connect(url, compression=None, max_size=None, additional_headers=headers)
        self.metadata = openpi_wire.unpack(self._ws.recv())

    def infer(self, obs: dict) -> dict:
        self._ws.send(self._wire.pack(obs))
        reply = self._ws.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return self._wire.unpack(reply)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--obs", required=True, help="npz with image (K,H,W,3), state (K,P), prompt (K,)")
    p.add_argument("--url", action="append", required=True, help="route=ws://host:port/embodiment, repeatable")
    p.add_argument("--token", default=None)
    args = p.parse_args(argv)
    data = np.load(args.obs)
    obs = [
        {"observation/image": data["image"][k], "observation/state": data["state"][k], "prompt": str(data["prompt"][k])}
        for k in range(len(data["image"]))
    ]
    clients, kind = {}, None
    for item in args.url:
        route, _, url = item.partition("=")
        clients[route], kind = _client(url, args.token)
        clients[route].infer(obs[0])  # warm: the first call of a connection pays its set-up
    print("ready", flush=True)
    schedule = json.loads(sys.stdin.readline())
    windows = []
    k = 0
    for w in schedule:
        client, calls, lat, infer = clients[w["route"]], 0, [], []
        while time.time() < w["start"]:
            time.sleep(0.001)
        while True:
            t0 = time.time()
            if t0 >= w["end"]:
                break
            timing = client.infer(obs[k % len(obs)]).get("server_timing") or {}
            k += 1
            if t0 >= w["measure_from"]:
                calls += 1
                lat.append((time.time() - t0) * 1e3)
                infer.append(float(timing.get("infer_ms", "nan")))  # the server's forward for this call
        windows.append({"route": w["route"], "calls": calls, "latencies_ms": lat, "infer_ms": infer})
    print(json.dumps({"client": kind, "windows": windows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
