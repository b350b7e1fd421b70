"""Where `fleet up` serves robots and monitors outside Ray: the HTTP ingress, the openpi websocket endpoint and the
Prometheus metrics, their ports, their token and their URLs (no Ray here; fleet/cluster/launcher.py deploys them).

    plan = plan_endpoints(config)        # ports claimed (0 -> a free one), token resolved; FleetError-worthy
    plan.urls(http_base)                 # {"http": "http://127.0.0.1:8000", "openpi": "ws://...:8001", "metrics": ...}

The token: `FleetConfig.api_token`, else $FLEET_API_TOKEN, else the fleet's own file (~/.cache/fleet/api_token,
made once, 0600); `require_token=False` serves without one (loopback only). It is a separate secret from the
Ray token: a robot that holds it can ask for actions and read metrics, not join the cluster.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from fleet.cluster.config import FleetConfig
from fleet.cluster.local_head import ensure_api_token
from fleet.names import NAMESPACE

TOKEN_ENV = "FLEET_API_TOKEN"


class EndpointError(RuntimeError):
    """A port that is taken or a token that cannot be had; the message says which and what to do."""


@dataclass(frozen=True)
class EndpointPlan:
    host: str
    http_port: int | None  # None: no HTTP ingress; 0: wherever Serve's proxy listens (a free port)
    openpi_port: int | None
    metrics_port: int | None
    token: str | None
    http_prefix: str  # the ingress' route prefix on Serve's proxy: "/" for the default fleet, "/<namespace>" else

    def urls(self, http_base: str | None) -> dict[str, str | None]:
        """The endpoints' URLs as `fleet status` shows them; http_base: Serve's proxy, "http://host:port"."""
        prefix = "" if self.http_prefix == "/" else self.http_prefix
        return {
            "http": f"{http_base}{prefix}" if self.http_port is not None and http_base else None,
            "openpi": f"ws://{_url_host(self.host)}:{self.openpi_port}" if self.openpi_port else None,
            "metrics": f"http://{_url_host(self.host)}:{self.metrics_port}/metrics" if self.metrics_port else None,
        }


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR as asyncio's servers set it, so a port whose
    last connections linger in TIME_WAIT counts as free; one another process listens on, even with
    SO_REUSEPORT, does not)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str, avoid: set[int] = frozenset()) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _claim(host: str, port: int | None, what: str, flag: str, taken: set[int]) -> int | None:
    if port is None:
        return None
    if port == 0:
        port = free_port(host, taken)
    elif not port_free(host, port):
        raise EndpointError(
            f"{what}: {host}:{port} is in use (another fleet, or another program); "
            f"give it another port ({flag} N, 0 = any free one) or turn it off "
            f"(--no-{flag.removeprefix('--').removesuffix('-port')})"
        )
    taken.add(port)
    return port


def resolve_token(config: FleetConfig) -> str | None:
    if not config.require_token:
        return None
    token = config.api_token or os.environ.get(TOKEN_ENV, "").strip()
    return token or ensure_api_token()


def plan_endpoints(config: FleetConfig, serve_running: bool) -> EndpointPlan:
    """Claim the ports (a taken one is EndpointError naming its flag) and resolve the token. With Serve already
    running on this Ray (another fleet), the HTTP ingress joins its proxy wherever that listens."""
    host, taken = config.endpoint_host, set()
    http = config.http_port
    if http is not None and not serve_running:
        http = _claim(host, http, "HTTP ingress", "--http-port", taken)
    openpi = _claim(host, config.openpi_port, "openpi endpoint", "--openpi-port", taken)
    metrics = _claim(host, config.metrics_port, "metrics endpoint", "--metrics-port", taken)
    prefix = "/" if config.namespace == NAMESPACE else f"/{config.namespace}"
    return EndpointPlan(host, http, openpi, metrics, resolve_token(config), prefix)
