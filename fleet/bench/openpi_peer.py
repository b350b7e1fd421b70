"""The peer `fleet bench serve --route openpi,peer` measures against: openpi's own server design around our policy.

openpi's `WebsocketPolicyServer` is one asyncio websocket server that, for each request, calls `policy.infer(obs)`
inline on its event loop (no batching: concurrent robots take turns) and adds `server_timing.infer_ms`. This is
that design, faithfully, wrapped around the fleet's `PolicyRuntime` at batch 1 with the same observation mapping
as our endpoint (fleet/serving/openpi_wire.py), so the two differ only in how they serve, not in what they compute.

    python -m fleet.bench.openpi_peer --port 8101 --threads 1 [--checkpoint P] [--token T]
"""

from __future__ import annotations

import argparse
import asyncio
import http
import itertools
import time
import traceback

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from fleet.serving import openpi_wire


class InlinePolicyServer:
    """openpi's server loop: metadata on connect, then recv -> infer inline -> send, until the client goes."""

    def __init__(self, runtime, token: str | None = None) -> None:
        self.runtime = runtime
        self.specs = runtime.model.specs
        self.token = token
        self._ids = itertools.count()

    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.token and request.headers.get("Authorization", "") != f"Api-Key {self.token}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Unauthorized\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        name = ws.request.path.strip("/") or None
        robot_id = f"peer-{next(self._ids)}"
        await ws.send(openpi_wire.pack({"server": "openpi-style peer", "embodiment": name}))
        prev_total_ms = None
        for tick in itertools.count():
            try:
                t0 = time.perf_counter()
                obs = openpi_wire.unpack(await ws.recv())
                request = openpi_wire.observation_to_request(obs, self.specs, name, robot_id, tick)
                t_infer = time.perf_counter()
                reply = self.runtime.act_batch([request])[0]  # policy.infer, inline on the loop, batch 1
                infer_ms = (time.perf_counter() - t_infer) * 1e3
                if "error" in reply:
                    raise ValueError(reply["error"])
                out = {"actions": reply["chunk"], "server_timing": {"infer_ms": infer_ms}}
                if prev_total_ms is not None:
                    out["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(openpi_wire.pack(out))
                prev_total_ms = (time.perf_counter() - t0) * 1e3
            except ConnectionClosed:
                return
            except Exception:  # noqa: BLE001 - as openpi: the traceback as text, then close 1011
                await ws.send(traceback.format_exc())
                await ws.close(CloseCode.INTERNAL_ERROR, "Internal server error. Traceback included in previous frame.")
                return

    async def run(self, host: str, port: int) -> None:
        async with serve(
            self.handler, host, port, compression=None, max_size=None, process_request=self._process_request
        ) as server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the fleet replica's, for a fair match)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--token", default=None)
    args = p.parse_args(argv)
    from fleet.policy.openmp import set_omp_wait_policy

    set_omp_wait_policy()  # as a fleet replica does, before torch loads
    from fleet.serving.runtime import PolicyRuntime

    runtime = PolicyRuntime(args.checkpoint, threads=args.threads, max_batch=1)
    asyncio.run(InlinePolicyServer(runtime, args.token).run(args.host, args.port))


if __name__ == "__main__":
    main()
