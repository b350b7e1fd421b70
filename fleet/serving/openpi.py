"""The openpi-compatible websocket endpoint: an unmodified `openpi-client` drives a fleet embodiment.

    server = OpenpiServer(replica.act, runtime.model.specs, runtime.head_versions, token="s3cret")
    await server.start("127.0.0.1", 8001)

    # a robot, in openpi's own client (its own venv: openpi-client pins numpy < 2)
    policy = WebsocketClientPolicy("127.0.0.1", 8001, api_key="s3cret")        # or ws://127.0.0.1:8001/franka
    chunk = policy.infer({"observation/image": img, "observation/state": q, "prompt": "pick up the red cube",
                          "embodiment": "franka"})["actions"]                   # (16, 7) float32

The protocol is openpi's (its `WebsocketPolicyServer` and `openpi_client`): on connect the server sends one
binary msgpack frame with its metadata; each request is one binary msgpack frame (numpy as in
fleet/serving/openpi_wire.py), answered by one binary frame with `actions` (chunk, action_dim) float32 and
`server_timing: {infer_ms, ...}`, plus ours: `head_version`, `embodiment`, `confidence`. An error is a text
frame holding the message, then close code 1011 (INTERNAL_ERROR), as openpi does; the endpoint keeps serving
every other connection. `Authorization: Api-Key <token>` when a token is set. `GET /healthz` answers 200.

Where it runs: inside every PolicyServer replica, on the replica's event loop (deployments/policy.py), like
the direct socket. A request is handed to the replica's own `@serve.batch` `act`, so it joins the same batch
as robots on the Serve handle and the direct route, and pays no Serve hop (~3 ms here) that openpi's inline
server does not pay either. Replicas of one node bind the same port with SO_REUSEPORT; the kernel spreads
connections over them. No torch and no Ray here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from fleet.control.confidence import ConfidenceEstimator
from fleet.embodiments import EmbodimentSpec
from fleet.protocol import IMAGE_SHAPE
from fleet.serving import openpi_wire
from fleet.serving.openpi_wire import ObservationError

log = logging.getLogger(__name__)

MAX_FRAME = 8 << 20
# largest request frame: a 1920 x 1080 RGB camera frame is 6.2 MB
MAX_CONNECTIONS = 64
# robots one replica serves at once; more get HTTP 503 at the handshake
REPLY_TIMEOUT_S = 30.0
# a request the batch does not answer within this is an error frame, not a connection that hangs


class OpenpiServer:
    """openpi's websocket policy protocol over an async `act(request) -> reply` (fleet.protocol)."""

    def __init__(
        self,
        act: Callable[[dict], Awaitable[dict]],
        specs: dict[str, EmbodimentSpec],
        head_versions: Callable[[], dict[str, int]],
        token: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_frame: int = MAX_FRAME,
        act_now: Callable[[dict], dict | None] | None = None,
    ) -> None:
        """act_now: where the host can answer a request at once (a lone robot, PolicyServer.act_inline), the
        reply now, or None when it must go to `act`; that path then needs no timer."""
        self._act = act
        self._act_now = act_now
        self.specs = dict(specs)
        self._head_versions = head_versions
        self._token = token.encode() if token else None
        self.max_connections = int(max_connections)
        self.max_frame = int(max_frame)
        self._server: Server | None = None
        self._ids = itertools.count()
        self._confidence = ConfidenceEstimator()
        self.host: str | None = None
        self.port: int | None = None
        self.connections = 0
        self.counts = {"requests": 0, "errors": 0, "refused": 0, "connections_total": 0}

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> tuple[str, int]:
        """Listen on host:port (0: any free port); reuse_port lets several replicas of a node share it."""
        self._server = await serve(
            self._connection,
            host,
            port,
            process_request=self._process_request,
            max_size=self.max_frame,
            compression=None,  # openpi-client turns compression off; images do not compress anyway
            max_queue=4,
            reuse_port=reuse_port,
        )
        self.host, self.port = next(iter(self._server.sockets)).getsockname()[:2]
        return self.host, self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def stats(self) -> dict:
        return dict(self.counts) | {"connections": self.connections, "port": self.port}

    # ---- the handshake: health, path, token, connection limit ------------------------------------
    def _path_embodiment(self, path: str) -> tuple[bool, str | None]:
        name = path.split("?", 1)[0].strip("/")
        if not name:
            return True, None
        return name in self.specs, name

    def _process_request(self, connection: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        known, name = self._path_embodiment(path)
        if not known:
            self.counts["refused"] += 1
            return connection.respond(
                http.HTTPStatus.NOT_FOUND, f"path: expected / or /<embodiment> with one of {sorted(self.specs)}\n"
            )
        if self._token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() not in ("api-key", "bearer") or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                self.counts["refused"] += 1
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "authorization: missing or wrong Api-Key\n")
        if self.connections >= self.max_connections:
            self.counts["refused"] += 1
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"connections: at most {self.max_connections} at once\n"
            )
        return None

    def metadata(self, embodiment: str | None) -> dict:
        """The frame sent on connect: what this server serves, so a client can check before its first call."""
        versions = self._head_versions()
        return {
            "server": "vla-fleet",
            "protocol": "openpi-websocket",
            "embodiment": embodiment,
            "image_shape": list(IMAGE_SHAPE),
            "embodiments": {
                name: {
                    "action_dim": spec.action_dim,
                    "chunk_size": spec.chunk_size,
                    "state_dim": spec.proprio_dim,
                    "control_hz": spec.control_hz,
                    "head": spec.head,
                    "head_version": versions.get(name),
                }
                for name, spec in sorted(self.specs.items())
            },
            "observation_keys": {
                "image": list(openpi_wire.IMAGE_KEYS),
                "state": list(openpi_wire.STATE_KEYS),
                "prompt": list(openpi_wire.PROMPT_KEYS),
                "embodiment": "embodiment (or the URL path /<embodiment>)",
            },
        }

    # ---- one connection ---------------------------------------------------------------------------
    async def _connection(self, ws: ServerConnection) -> None:
        _, embodiment = self._path_embodiment(ws.request.path)
        robot_id = f"openpi-{next(self._ids)}"
        self.connections += 1
        self.counts["connections_total"] += 1
        try:
            await ws.send(openpi_wire.pack(self.metadata(embodiment)))
            prev_total_ms = None
            for tick in itertools.count():
                frame = await ws.recv()
                t0 = time.perf_counter()
                try:
                    reply = await self._infer(frame, embodiment, robot_id, tick)
                except (TimeoutError, ObservationError, ValueError, TypeError) as exc:
                    await self._fail(ws, exc)
                    return
                total_ms = (time.perf_counter() - t0) * 1e3
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                reply["server_timing"]["total_ms"] = total_ms
                prev_total_ms = total_ms
                await ws.send(openpi_wire.pack(reply))
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - never let one connection take the endpoint down
            log.exception("openpi connection %s failed", robot_id)
            with contextlib.suppress(Exception):
                await self._fail(ws, exc)
        finally:
            self.connections -= 1

    async def _infer(self, frame: bytes | str, embodiment: str | None, robot_id: str, tick: int) -> dict:
        if isinstance(frame, str):
            raise ValueError("frame: expected a binary msgpack frame, got a text frame")
        obs = openpi_wire.unpack(frame)
        request = openpi_wire.observation_to_request(obs, self.specs, embodiment, robot_id, tick)
        self.counts["requests"] += 1
        reply = self._act_now(request) if self._act_now is not None else None
        if reply is None:
            async with asyncio.timeout(REPLY_TIMEOUT_S):  # no extra task per call, unlike wait_for on 3.11
                reply = await self._act(request)
        if not isinstance(reply, dict) or reply.get("error") is not None:
            raise ValueError(str(reply.get("error") if isinstance(reply, dict) else "reply: not a dict"))
        return self._to_openpi(reply)

    def _to_openpi(self, reply: dict) -> dict:
        """A fleet reply -> openpi's: `actions` (T, D) float32 first; every other value is a scalar or a dict, so
        openpi's ActionChunkBroker (which slices every array by step) hands out one action per step."""
        timing = reply.get("server_timing") or {}
        out = {
            "actions": reply["chunk"],
            "server_timing": {
                "infer_ms": float(timing.get("infer_ms", 0.0)),
                "batch_size": int(timing.get("batch_size", 1)),
            },
            "head_version": int(reply["head_version"]),
            "embodiment": reply["embodiment"],
        }
        try:
            out["confidence"] = self._confidence.estimate(reply).to_dict()
        except ValueError as exc:  # a reply the estimator cannot read: say so rather than fail the call
            out["confidence"] = {"known": False, "reasons": [str(exc)]}
        return out

    async def _fail(self, ws: ServerConnection, exc: BaseException) -> None:
        """openpi's error path: the message as a text frame, then close 1011."""
        self.counts["errors"] += 1
        message = str(exc) if isinstance(exc, ValueError | TypeError) else f"internal: {type(exc).__name__}: {exc}"
        if isinstance(exc, asyncio.TimeoutError):
            message = f"timeout: no reply from the policy within {REPLY_TIMEOUT_S:g} s"
        with contextlib.suppress(ConnectionClosed):
            await ws.send(message)
            await ws.close(CloseCode.INTERNAL_ERROR, "error; the message is in the previous frame")


def batch_queue_depth(batched_method) -> int | None:
    """Requests waiting in a `@serve.batch` method's queue (the replica's queue depth for metrics); None where
    Ray's batching internals differ from 2.60's (the wrapper's bound helpers lead to its `_queue`)."""
    helper = getattr(batched_method, "_get_curr_iteration_start_times", None)
    wrapper = getattr(helper, "__self__", None)
    queue = getattr(getattr(wrapper, "_queue", None), "queue", None)
    try:
        return int(queue.qsize()) if queue is not None else (0 if wrapper is not None else None)
    except Exception:  # noqa: BLE001 - metrics only: never fail a stats call
        return None
