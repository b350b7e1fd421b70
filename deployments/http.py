"""HTTP ingress for robots outside Ray: decode, validate, forward to PolicyServer through a handle.

    from ray import serve
    from deployments.http import build_http_app
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_http_app({"checkpoint": "...", "auth_token": "s3cret"}), name="fleet-http", route_prefix="/")

    POST /v1/act   JSON body (arrays as nested lists or {"b64", "shape"}), or Content-Type
                   application/msgpack (image as raw bytes); reply JSON, or msgpack if Accept asks for it
    GET  /healthz  {"status": "ok", "heads": {embodiment: version}}

A malformed request gets a 4xx whose JSON names the field and the problem ({"error", "field"}):
400 unparseable body, 401 bad or missing token, 413 too large (also a chunked body, checked while it
streams in), 415 unknown content type, 422 a field out of shape or range. Validation happens here, so only
compact numpy arrays travel inside Ray.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime
import hmac
import json
import socket

import msgpack
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle

from deployments.policy import policy_deployment
from fleet.embodiments import EMBODIMENTS
from fleet.protocol import (
    RequestError,
    error_field,
    reply_error,
    reply_to_jsonable,
    reply_to_msgpackable,
    validate_request,
)
from fleet.serving.config import ServeConfig

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")

api = FastAPI(title="fleet policy", docs_url=None, redoc_url=None)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field or error_field(message)}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, read chunk by chunk; None as soon as it passes `limit` bytes (the rest is never
    read: a chunked upload has no Content-Length to refuse up front)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=256,
    logging_config={"enable_access_log": False},
)
@serve.ingress(api)
class HttpIngress:
    def __init__(self, policy: DeploymentHandle, config: dict | None = None) -> None:
        self.policy = policy
        self.config = ServeConfig.from_dict(config)
        self._token = self.config.auth_token.encode() if self.config.auth_token else None
        self.rejected = 0

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    @api.post("/v1/act")
    async def act(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse(
                {"error": "authorization: missing or wrong bearer token", "field": "authorization"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return self._reject(413, f"body: {declared} bytes exceeds the limit of {limit}")
        body = await read_body(request, limit)
        if body is None:  # a chunked upload (or a lying Content-Length) past the limit: stopped reading there
            return self._reject(413, f"body: more than {limit} bytes, the limit")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            if ctype in MSGPACK_TYPES:
                payload = msgpack.unpackb(body, raw=False)
            elif ctype in ("application/json", ""):
                payload = json.loads(body)
            else:
                return self._reject(415, f"content-type: expected application/json or application/msgpack, got {ctype}")
        except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError) as exc:
            return self._reject(400, f"body: not valid {ctype} ({type(exc).__name__})")
        except Exception as exc:  # noqa: BLE001 - msgpack raises assorted errors on garbage
            return self._reject(400, f"body: not valid {ctype} ({type(exc).__name__})")
        try:
            req = validate_request(payload, EMBODIMENTS)
        except RequestError as exc:
            return self._reject(422, str(exc))
        reply = await self.policy.act.remote(req)
        err = reply_error(reply)
        if err is not None:
            return self._reject(422 if not err.startswith("internal:") else 500, err)
        accept = request.headers.get("accept", "")
        if any(t in accept for t in MSGPACK_TYPES):
            return Response(msgpack.packb(reply_to_msgpackable(reply)), media_type="application/msgpack")
        return JSONResponse(reply_to_jsonable(reply))

    def _reject(self, status: int, message: str) -> JSONResponse:
        self.rejected += 1
        return _error(status, message)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "heads": await self.policy.head_versions.remote()}

    async def check_health(self) -> None:
        """Healthy while it can build replies; the PolicyServer reports its own health."""


def build_http_app(config: dict | ServeConfig | None = None) -> Application:
    """HttpIngress bound to a PolicyServer built from the same config (keys: fleet.serving.config.ServeConfig)."""
    cfg = ServeConfig.from_dict(config)
    ingress = HttpIngress.options(ray_actor_options={"num_cpus": cfg.ingress_cpus})
    return ingress.bind(policy_deployment(cfg).bind(cfg.to_dict()), cfg.to_dict())


def http_address() -> str:
    """http://host:port of this Ray's running Serve HTTP proxy (Serve must be started)."""
    options = _get_global_client().http_config
    return f"http://{options.host or '127.0.0.1'}:{options.port}"


def start_serve(host: str = "127.0.0.1", port: int | None = 8000) -> str:
    """Start Serve with its HTTP proxy on host:port (port None = a free one) unless Serve already runs
    in this Ray; returns the proxy's address either way. Binds 127.0.0.1 unless told otherwise."""
    if _get_global_client(raise_if_no_controller_running=False) is None:
        if port is None:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        serve.start(http_options={"host": host, "port": port})
    return http_address()
