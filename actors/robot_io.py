"""How a robot actor talks to the rest of the fleet: policy clients (the PolicyClient protocol of
fleet/robot/client.py) and correction sinks, where a `Correction` record becomes the dict that crosses Ray.
Ray only, no Serve import in the robot's process for the default "gateway" and "direct" routes.

  NoPolicyClient  route "none": every request fails, the robot holds
  DirectClient    route "direct": a TCP connection to a replica's direct socket, the gateway as fallback
  GatewayClient   route "gateway": this node's PolicyGateway actor (holds the Serve handle), polled with ray.wait
  HandleClient    route "handle": the robot's own Serve DeploymentHandle, polled with result(timeout_s=0)
  MemorySink      no replay actor: corrections kept (bounded) until take()n
  ReplaySink      the named ReplayActor: sent without blocking, delivered once acknowledged (durable)
"""

from __future__ import annotations

import time
import zlib
from collections import deque

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# the module itself, not fleet.data: robot processes run without pyarrow, which fleet.data's store needs
from fleet.data.correction import Correction
from fleet.names import GATEWAY_PREFIX, HEADS, NAMESPACE
from fleet.serving.direct import DirectConnection

MAX_PENDING_CORRECTIONS = 5000
# corrections a robot holds while the replay actor is unreachable (~13 kB each); beyond, the oldest go


# ---- policy clients ------------------------------------------------------------------------------
class NoPolicyClient:
    """route "none": every request fails, so the robot holds."""

    def submit(self, request: dict) -> None:
        raise ConnectionError("no policy server configured for this robot")

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        return None

    def cancel(self) -> None:
        pass


class GatewayClient:
    """PolicyClient over this node's PolicyGateway actor: an ObjectRef polled with ray.wait(timeout)."""

    def __init__(self, app: str, namespace: str) -> None:
        self.app, self.namespace = app, namespace
        self._gateway = None
        self._ref = None

    def _get_gateway(self):
        if self._gateway is None:
            self._gateway = gateway_for_this_node(self.app, self.namespace)
        return self._gateway

    def submit(self, request: dict) -> None:
        self._ref = self._get_gateway().act.remote(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._ref is None:
            return None
        ready, _ = ray.wait([self._ref], timeout=timeout_s)
        if not ready:
            return None
        ref, self._ref = self._ref, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            self._gateway = None  # look it up again: Ray may have restarted it elsewhere
            raise

    def cancel(self) -> None:
        ref, self._ref = self._ref, None
        if ref is not None:
            try:  # drops it from the gateway's queue if no replica took it yet; a running batch finishes
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort: the reply would be ignored anyway
                pass


class HandleClient:
    """PolicyClient over a Serve DeploymentHandle held by the robot itself (imports Ray Serve)."""

    def __init__(self, app: str) -> None:
        from ray import serve  # Ray Serve (+35 MB) only in a robot that asked for the "handle" route

        self.app = app
        self._handle = serve.get_app_handle(app)
        self._response = None

    def submit(self, request: dict) -> None:
        self._response = self._handle.act.remote(request)

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._response is None:
            return None
        try:
            reply = self._response.result(timeout_s=timeout_s)
        except TimeoutError:  # not assigned to a replica yet, or not finished (GetTimeoutError is one too)
            return None
        self._response = None
        return reply

    def cancel(self) -> None:
        self._response = None  # the replica finishes it; nobody reads the reply


class DirectClient:
    """route "direct": the robot's own TCP connection to one policy replica (fleet/serving/direct.py), the gateway
    as fallback.

    The replicas' sockets are listed by the head registry (`HeadStore.endpoints`); a robot picks one by a
    stable hash of its id, so robots spread over replicas. While no replica is reachable (none listed yet,
    a loopback socket on another node, a refused connection) requests go through the gateway, and the
    registry is asked again after `retry_s`. A connection lost with a request in flight resends that
    request through the gateway: a restarted replica costs one slower call, not a hold.
    """

    def __init__(self, robot_id: str, app: str, namespace: str, registry: str, retry_s: float = 2.0) -> None:
        self.robot_id, self.registry, self.namespace, self.retry_s = robot_id, registry, namespace, retry_s
        self._gateway = GatewayClient(app, namespace)
        self._conn = None
        self._listing = None  # ObjectRef of a registry.endpoints() call in flight
        self._next_try = 0.0
        self._via: str | None = None  # "direct" | "gateway": where the outstanding request went
        self._request: dict | None = None
        self.direct_calls = self.gateway_calls = self.reconnects = 0
        self.last_error: str | None = None

    def _connection(self):
        """The open connection, or None (then the gateway serves). Never blocks the control loop: the registry
        is asked with a call that a later submit collects, and a connect goes to a socket listed as live."""
        if self._conn is not None:
            return self._conn
        try:
            if self._listing is not None:
                ready, _ = ray.wait([self._listing], timeout=0)
                if not ready:
                    return None
                listed, self._listing = ray.get(self._listing), None
                endpoint = pick_endpoint(listed, self.robot_id, ray.get_runtime_context().get_node_id())
                if endpoint is not None:
                    self._conn = DirectConnection(
                        endpoint["host"], endpoint["port"], connect_timeout_s=0.2, token=endpoint.get("token")
                    )
                    self.reconnects += 1
            elif time.monotonic() >= self._next_try:
                self._next_try = time.monotonic() + self.retry_s
                registry = ray.get_actor(self.registry, namespace=self.namespace)
                self._listing = registry.endpoints.remote()
        except Exception as exc:  # noqa: BLE001 - no registry, no replica, refused: the gateway serves meanwhile
            self._listing = None
            self.last_error = f"direct route: {type(exc).__name__}: {exc}"
        return self._conn

    def _drop(self, exc: BaseException) -> None:
        self.last_error = f"direct route: {type(exc).__name__}: {exc}"
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._next_try = time.monotonic() + self.retry_s

    def submit(self, request: dict) -> None:
        self._request = request
        conn = self._connection()
        if conn is not None:
            try:
                conn.submit(request)
                self._via = "direct"
                self.direct_calls += 1
                return
            except OSError as exc:
                self._drop(exc)
        self._gateway.submit(request)
        self._via = "gateway"
        self.gateway_calls += 1

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        if self._via == "direct":
            try:
                reply = self._conn.poll(timeout_s)
            except (OSError, ValueError) as exc:  # lost connection or a garbled frame: resend via the gateway
                self._drop(exc)
                self._gateway.submit(self._request)
                self._via = "gateway"
                self.gateway_calls += 1
                return None
        elif self._via == "gateway":
            reply = self._gateway.poll(timeout_s)
        else:
            return None
        if reply is not None:
            self._via = self._request = None
        return reply

    def cancel(self) -> None:
        if self._via == "direct" and self._conn is not None:
            self._conn.cancel()
        elif self._via == "gateway":
            self._gateway.cancel()
        self._via = self._request = None

    def stats(self) -> dict:
        return {
            "direct_calls": self.direct_calls,
            "gateway_calls": self.gateway_calls,
            "direct_connected": self._conn is not None,
            "direct_connects": self.reconnects,
            "direct_last_error": self.last_error,
        }


def pick_endpoint(endpoints: list[dict], robot_id: str, node_id: str) -> dict | None:
    """The replica socket robot `robot_id` on node `node_id` uses: among those it can reach (on its node, or
    listening on a routable address), preferring its own node, chosen by a stable hash of the robot id."""

    def local_only(e: dict) -> bool:
        return str(e.get("host", "")).startswith("127.") or e.get("host") in ("localhost", "::1")

    usable = [e for e in endpoints if e.get("node_id") == node_id or not local_only(e)]
    same = [e for e in usable if e.get("node_id") == node_id]
    pool = sorted(same or usable, key=lambda e: str(e.get("replica")))
    if not pool:
        return None
    return pool[zlib.crc32(robot_id.encode()) % len(pool)]


class _PolicyGateway:
    """Forwards act requests from the robots on its node to the Serve app (async: many in flight at once)."""

    def __init__(self, app: str) -> None:
        self.app = app
        self._handle = None
        self.calls = 0

    async def act(self, request: dict) -> dict:
        if self._handle is None:
            from ray import serve  # Ray Serve only in the gateway's process, never in the robots calling it

            self._handle = serve.get_app_handle(self.app)  # raises while the app does not exist
        self.calls += 1
        return await self._handle.act.remote(request)

    def ping(self) -> dict:
        return {"app": self.app, "calls": self.calls, "node_id": ray.get_runtime_context().get_node_id()}


PolicyGateway = ray.remote(num_cpus=0, max_restarts=-1)(_PolicyGateway)


def gateway_for_this_node(app: str, namespace: str):
    """The detached PolicyGateway of the caller's node, created on first use (`fleet down` removes it)."""
    node_id = ray.get_runtime_context().get_node_id()
    return PolicyGateway.options(
        name=f"{GATEWAY_PREFIX}{app}-{node_id[:16]}",
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True),
    ).remote(app)


def make_client(policy: dict | None, robot_id: str = ""):
    policy = dict(policy or {"route": "none"})
    route = policy.get("route", "gateway")
    if route == "none":
        return NoPolicyClient()
    if route == "gateway":
        return GatewayClient(policy["app"], policy.get("namespace", NAMESPACE))
    if route == "handle":
        return HandleClient(policy["app"])
    if route == "direct":
        return DirectClient(robot_id, policy["app"], policy.get("namespace", NAMESPACE), policy.get("registry", HEADS))
    raise ValueError(f"policy.route: expected 'direct', 'gateway', 'handle' or 'none', got {route!r}")


# ---- correction sinks ----------------------------------------------------------------------------
class MemorySink:
    """No replay actor configured: keep corrections (bounded, as dicts) until someone `take()`s them."""

    def __init__(self, limit: int = MAX_PENDING_CORRECTIONS) -> None:
        self.items: deque[dict] = deque(maxlen=limit)
        self.dropped = 0

    def __call__(self, batch: list[Correction]) -> None:
        self.dropped += max(0, len(self.items) + len(batch) - (self.items.maxlen or 0))
        self.items.extend(c.to_dict() for c in batch)

    def pump(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def take(self) -> list[dict]:
        out = list(self.items)
        self.items.clear()
        return out

    def stats(self) -> dict:
        return {"corrections_held": len(self.items), "corrections_dropped": self.dropped}


class ReplaySink:
    """Sends corrections (as `to_dict()`, what the replay actor's add() takes) to the named ReplayActor without
    blocking the control loop. A batch counts as delivered only when the actor acknowledged it (it is durable
    then); a failed send is retried, and correction ids make the retry harmless."""

    def __init__(self, name: str, namespace: str, retry_after_s: float = 1.0) -> None:
        self.name, self.namespace, self.retry_after_s = name, namespace, retry_after_s
        self._actor = None
        self._inflight: list[tuple[ray.ObjectRef, list[dict]]] = []
        self._retry: deque[dict] = deque()
        self._next_retry = 0.0
        self.acked = self.rejected = self.dropped = self.send_errors = 0
        self.last_error: str | None = None

    def __call__(self, batch: list[Correction]) -> None:
        self._send([c.to_dict() for c in batch])

    def _send(self, batch: list[dict]) -> None:
        try:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=self.namespace)
            self._inflight.append((self._actor.add.remote(batch), batch))
        except Exception as exc:  # noqa: BLE001 - keep the batch, try again later
            self._failed(batch, exc)

    def _failed(self, batch: list[dict], exc: BaseException) -> None:
        self._actor = None
        self.send_errors += 1
        self.last_error = f"replay actor {self.name!r}: {type(exc).__name__}: {exc}"
        self._retry.extend(batch)
        while len(self._retry) > MAX_PENDING_CORRECTIONS:
            self._retry.popleft()
            self.dropped += 1
        self._next_retry = time.monotonic() + self.retry_after_s

    def pump(self, timeout_s: float = 0.0) -> None:
        """Collect acknowledgements (waiting up to timeout_s) and resend what failed once its backoff passed."""
        if self._inflight:
            refs = [ref for ref, _ in self._inflight]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            done = set(ready)
            still = []
            for ref, batch in self._inflight:
                if ref not in done:
                    still.append((ref, batch))
                    continue
                try:
                    ack = ray.get(ref)
                except Exception as exc:  # noqa: BLE001
                    self._failed(batch, exc)
                    continue
                self.acked += len(ack["accepted"]) + len(ack["duplicates"])
                self.rejected += len(ack["rejected"])
                if ack["rejected"]:
                    self.last_error = f"replay store rejected a correction: {ack['rejected'][0]['error']}"
            self._inflight = still
        if self._retry and time.monotonic() >= self._next_retry:
            batch = list(self._retry)
            self._retry.clear()
            self._send(batch)

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything sent is acknowledged; True when nothing is left undelivered."""
        deadline = time.monotonic() + timeout_s
        while self._inflight or self._retry:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._next_retry = min(self._next_retry, time.monotonic() + min(left, 0.2))
            self.pump(timeout_s=min(left, 0.5))
            if self._retry and not self._inflight:
                time.sleep(min(0.2, max(0.0, left)))
        return True

    def stats(self) -> dict:
        inflight = sum(len(b) for _, b in self._inflight)
        return {
            "corrections_acked": self.acked,
            "corrections_inflight": inflight + len(self._retry),
            "corrections_rejected": self.rejected,
            "corrections_dropped": self.dropped,
            "replay_errors": self.send_errors,
            "replay_last_error": self.last_error,
        }
