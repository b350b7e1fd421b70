"""Start or join Ray, bring a simulated fleet up, scale it, read its status and take it down.

    from fleet.cluster.config import FleetConfig
from fleet.cluster.endpoints import EndpointError, EndpointPlan, plan_endpoints
    from fleet.cluster.launcher import up, scale, status, down
    up(FleetConfig(robots={"franka": 2, "hello": 1}, realtime=False))
    scale({"franka": 8, "hello": 0})          # removed robots finish their episode and hand over corrections
    status()                                  # {"robots": [...], "heads": {"franka": 1, ...}}
    down()

What `up` creates (every name below is a constant of fleet/names.py), all in the Ray namespace
`config.namespace` ("fleet"): the Serve app `config.app_name` (deployments.policy.build_app), the
HeadRegistry "fleet-heads", the ReplayActor "fleet-replay", the FleetController "fleet-controller" (desired
counts + robot handles, so another process finds them) and robots "robot-<embodiment>-<i>" (created and
owned by the controller). With `adapt` (`fleet up --adapt`) also the LearnerActor "fleet-learner"
(actors.learner): every `adapt_every` corrections of an embodiment it adapts that head and publishes it to
the registry, which every replica polls; robots send it their episode outcomes, so a head that lowers
success is rolled back.

Endpoints for what runs outside Ray (fleet/cluster/endpoints.py plans them): the HTTP ingress (deployments/http.py,
its own Serve app `<app>-http` on Serve's proxy, 127.0.0.1:8000), the openpi websocket endpoint (in every policy
replica, 127.0.0.1:8001) and the Prometheus metrics (in the controller, 127.0.0.1:8002/metrics), all taking the
fleet's endpoint token; `status()["endpoints"]` has their URLs.

Finding the cluster from another shell: with no address, `connect` starts a private head
(fleet.cluster.local_head: `ray start --head --block` in a subprocess, token authentication on, its files in
a private 0700 directory, so other programs' `ray.init()` on this machine neither attach to it nor join it
without the token) and records it in a state file (~/.cache/fleet/cluster.json, or $FLEET_STATE_DIR).
`fleet status/scale/down` without --address read that file and join with the head's token. In-process
`ray.init()` is not used for this: it writes no address file, so no other process could find it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fleet.cluster.config import FleetConfig
from fleet.cluster.endpoints import EndpointError, EndpointPlan, plan_endpoints
from fleet.cluster.local_head import (
    LocalHeadError,
    cluster_join_env,
    join_env,
    read_state,
    resolve_address,
    start_local_head,
    state_file,
    stop_local_head,
)
from fleet.embodiments import EMBODIMENTS
from fleet.names import APP, CONTROLLER, GATEWAY_PREFIX, HEADS, LEARNER, NAMESPACE, REPLAY, ROBOT_PREFIX
from fleet.policy.default import DEFAULT_CHECKPOINT, REPRODUCE
from fleet.validate import is_int

__all__ = ["FleetError", "connect", "down", "reset_estop", "resolve_address", "scale", "state_file", "status", "up"]

_KEEP: dict[str, object] = {}
_STARTED_HEAD: dict | None = None
# the private head this process started (connect), stopped by down() or when up() fails
# handles of the actors `up` created in this process: a named, non-detached actor dies with its last handle


class FleetError(RuntimeError):
    """A fleet operation that cannot proceed; the message says why and what to do."""


# ---- finding and starting Ray --------------------------------------------------------------------
def connect(address: str | None = None, namespace: str = NAMESPACE, num_cpus: int | None = None,
            object_store_mb: int = 256) -> str:  # fmt: skip
    """Join Ray and return its GCS address. Already connected: that Ray. address None: the private local
    head `fleet up` started, or a new one sized `num_cpus` (see the module docstring); "auto", "host:port"
    or "ray://...": join it."""
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)

    global _STARTED_HEAD
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    try:
        state = read_state()
        if address is None and state:
            address = state["address"]  # a private head runs already (another `fleet up`): join it
        elif address is None:
            _STARTED_HEAD = start_local_head(num_cpus or os.cpu_count() or 1, object_store_mb)
            address = _STARTED_HEAD["address"]
            state = read_state()
    except LocalHeadError as exc:
        raise FleetError(str(exc)) from None
    if state and state["address"] == address:
        _join_with(join_env(state))  # our private head: join it the way it runs (token mode, its token)
    else:
        _join_with(cluster_join_env())  # a cluster started elsewhere: send a token if there is one
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises (auth, connection, version) becomes one line
        if _STARTED_HEAD is not None:
            stop_local_head(_STARTED_HEAD)
            _STARTED_HEAD = None
        cause = " ".join(str(exc).split(". ")[0].split())
        if address == "auto" and isinstance(exc, ConnectionError):
            raise FleetError("no fleet is running here: start one with `fleet up` (or pass --address)") from None
        if "uthenticat" in str(exc) or "token" in str(exc).lower():
            fix = "give fleet that cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        else:
            fix = "is a fleet up there? A cluster with token auth needs its token in ~/.ray/auth_token"
        raise FleetError(f"cannot join Ray at {address!r}: {type(exc).__name__}: {cause}\n  fix: {fix}") from None
    return ray.get_runtime_context().gcs_address


def _resolve(address: str | None) -> str:
    try:
        return resolve_address(address)
    except LocalHeadError as exc:
        raise FleetError(str(exc)) from None


def _join_with(env: dict[str, str]) -> None:
    """Ray reads RAY_AUTH_MODE and the token's place when its config is initialized: set them and refresh
    the config, as Ray does for a new head."""
    if not env:
        return  # nothing to add, or the user chose
    os.environ.update(env)
    try:
        from ray._raylet import Config  # Ray is loaded lazily (see the module docstring)

        Config.initialize("")
    except (ImportError, AttributeError):  # another Ray version: the environment variables are all it needs
        pass


# ---- the checkpoint, read without torch ----------------------------------------------------------
def checkpoint_meta(checkpoint: str | None) -> tuple[str, dict]:
    """(checkpoint prefix, its JSON metadata); FleetError naming the path when it is missing or unreadable."""
    p = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if p.is_dir():
        p = p / "policy"
    elif p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    meta_path, weights = p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")
    if not weights.exists() or not meta_path.exists():
        hint = f"; reproduce the shipped one with `{REPRODUCE}`" if checkpoint is None else ""
        raise FleetError(f"checkpoint {p}: {weights.name} and {meta_path.name} are both needed{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise FleetError(f"checkpoint {meta_path}: unreadable metadata ({exc})") from None
    return str(p.resolve()), meta


def _check_embodiments(counts: dict[str, int], meta: dict) -> None:
    served = set(meta.get("embodiments") or EMBODIMENTS)
    missing = sorted(n for n, c in counts.items() if c and n not in served)
    if missing:
        raise FleetError(f"the checkpoint has no head for {missing}; it serves {sorted(served)}")


# ---- fleet operations ----------------------------------------------------------------------------
def _controller(namespace: str):
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)

    try:
        return ray.get_actor(CONTROLLER, namespace=namespace)
    except ValueError:
        return None


def up(config: FleetConfig | None = None) -> dict:
    """Deploy the policy server, the head registry, the replay actor, the controller and the robots.
    Returns {"address", "namespace", "app", "robots": [ids], "checkpoint"}."""
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)

    config = config or FleetConfig()
    checkpoint, meta = checkpoint_meta(config.checkpoint)
    _check_embodiments(config.robots, meta)
    address = connect(config.address, config.namespace, config.cluster_cpus, config.object_store_mb)
    try:
        return _up(config, address, checkpoint, meta)
    except BaseException:
        global _STARTED_HEAD
        if _STARTED_HEAD is not None:  # do not leave a half-started private Ray behind
            ray.shutdown()
            stop_local_head(_STARTED_HEAD)
            _STARTED_HEAD = None
        raise


def _up(config: FleetConfig, address: str, checkpoint: str, meta: dict) -> dict:
    # lazily: Ray, and the Ray adapters (actors/, deployments/ import Ray), only when a fleet starts
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from actors.controller import FleetController
    from actors.heads import get_head_registry
    from actors.replay import start_replay_actor
    from deployments.http import start_serve
    from deployments.policy import build_app

    ns = config.namespace
    if _controller(ns) is not None:
        raise FleetError(f"a fleet is already running in namespace {ns!r}; use `fleet scale` or `fleet down`")
    serve_running = _get_global_client(raise_if_no_controller_running=False) is not None
    try:
        plan = plan_endpoints(config, serve_running)
    except (EndpointError, LocalHeadError) as exc:
        raise FleetError(str(exc)) from None
    http_base = start_serve(config.endpoint_host, plan.http_port or None)
    if config.app_name in serve.status().applications:  # Serve app names are global, not per namespace
        raise FleetError(
            f"the Serve app {config.app_name!r} already serves another fleet on this Ray; give this fleet its own "
            "(`fleet up --namespace NAME` names it fleet-policy-NAME)"
        )
    log_dir = Path(config.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    _KEEP[f"{ns}/{HEADS}"] = get_head_registry(HEADS, ns, log_dir / "heads", detached=config.detach)
    _KEEP[f"{ns}/{REPLAY}"] = start_replay_actor(
        log_dir / "corrections", name=REPLAY, namespace=ns, detached=config.detach
    )
    server = {"checkpoint": checkpoint, "num_replicas": config.replicas, "replica_cpus": config.replica_cpus}
    server |= {"registry": HEADS, "registry_namespace": ns}
    server |= {"openpi_port": plan.openpi_port, "openpi_host": plan.host, "auth_token": plan.token} | config.server
    serve.run(build_app(server), name=config.app_name, route_prefix=None)
    if plan.http_port is not None:
        _deploy_http(config.app_name, server, plan)
    if config.adapt:
        from actors.learner import start_learner  # Ray (and the learner's torch) only for an adapting fleet

        _KEEP[f"{ns}/{LEARNER}"] = start_learner(
            checkpoint,
            config=config.learner_config(),
            registry={"name": HEADS, "namespace": ns},
            replay={"name": REPLAY, "namespace": ns},
            state_dir=str(log_dir / "learner"),
            name=LEARNER,
            namespace=ns,
            detached=config.detach,
            num_cpus=config.learner_cpus,
        )
    # on the head node: it outlives any worker node, and its robots are restarted elsewhere
    options = {"name": CONTROLLER, "namespace": ns, "resources": {"node:__internal_head__": 0.001}}
    if config.detach:
        options["lifetime"] = "detached"
    # the controller reads the checkpoint's feature statistics itself (1.3 MB for the shipped one): as an
    # argument they would live in this process's object store, and a restarted controller could not get them
    # back once `fleet up` has exited
    own = {"log_dir": str(log_dir), "checkpoint": checkpoint, "api_token": plan.token}
    own["endpoints"] = endpoints = plan.urls(http_base)
    own["metrics"] = {"host": plan.host, "port": plan.metrics_port} if plan.metrics_port else None
    controller = FleetController.options(**options).remote(config.to_dict() | own)
    _KEEP[f"{ns}/{CONTROLLER}"] = controller
    robots = ray.get(controller.start.remote())
    out = {"address": address, "namespace": ns, "app": config.app_name, "robots": robots, "checkpoint": checkpoint}
    return out | {"endpoints": endpoints}


def _deploy_http(app_name: str, server: dict, plan: EndpointPlan) -> None:
    """The HTTP ingress as its own Serve app on the proxy, forwarding to this fleet's PolicyServer (no second one)."""
    from ray import serve

    from deployments.http import HttpIngress
    from fleet.serving.config import ServeConfig

    cfg = ServeConfig.from_dict(server)
    policy = serve.get_deployment_handle("PolicyServer", app_name)
    ingress = HttpIngress.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}).bind(policy, cfg.to_dict())
    serve.run(ingress, name=http_app_name(app_name), route_prefix=plan.http_prefix)


def http_app_name(app_name: str) -> str:
    return f"{app_name}-http"


def _require(address: str | None, namespace: str):
    connect(_resolve(address), namespace)
    controller = _controller(namespace)
    if controller is None:
        raise FleetError(f"no fleet is running in namespace {namespace!r}; start one with `fleet up`")
    return controller


def scale(counts: dict[str, int], address: str | None = None, namespace: str = NAMESPACE) -> dict:
    """Set the number of robots per embodiment ({"franka": 8, "leap": 0}); others are left as they are.
    Removed robots finish their episode and hand over their corrections before they stop.
    Returns {"added": [ids], "removed": [final reports], "robots": {embodiment: count}}."""
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)

    if not all(isinstance(n, str) and is_int(c) and c >= 0 for n, c in counts.items()):
        raise FleetError(f"scale: expected embodiment=count with counts >= 0, got {counts}")
    controller = _require(address, namespace)
    # a body added to the running fleet (`fleet embodiment add`): its onboarding actor starts and stops its robots
    onboarders = {}
    for name in (n for n in counts if n not in EMBODIMENTS):
        from actors.onboarder import onboarder_name  # Ray actors, only for a body beyond the pretrained four

        try:
            onboarders[name] = ray.get_actor(onboarder_name(name), namespace=namespace)
        except ValueError:
            known = sorted(EMBODIMENTS)
            raise FleetError(
                f"scale: unknown embodiment {name!r}: the fleet runs {known} and the bodies `fleet embodiment add`"
                " gave it; add it first"
            ) from None
    out = ray.get(controller.scale.remote({n: c for n, c in counts.items() if n in EMBODIMENTS}))
    for name, actor in onboarders.items():
        body = ray.get(actor.scale.remote(counts[name]))
        out["robots"][name] = body["robots"]
        out["added"] = list(out["added"]) + body["added"]
        out["removed"] = list(out["removed"]) + body["removed"]
    return out


def reset_estop(robot_id: str, address: str | None = None, namespace: str = NAMESPACE) -> dict:
    """An operator's reset of a robot's latched force e-stop: {"robot", "was_latched"}. FleetError for a robot
    the fleet does not have."""
    import ray  # lazily (see the module docstring)

    try:
        return ray.get(_require(address, namespace).reset_estop.remote(robot_id))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError):
            raise FleetError(str(exc.cause)) from None
        raise


def status(address: str | None = None, namespace: str = NAMESPACE, timeout_s: float = 3.0) -> dict:
    """{"robots": [{"id", "embodiment", "state", "control_hz", "episodes", "success_rate", "interventions",
    "head_version", "latency_p50_ms", "latency_p99_ms", ...}], "heads": {embodiment: version}, ...}, plus
    "learner" (state, versions, rounds, published, rollbacks, watch, last_round) when the fleet adapts."""
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)

    return ray.get(_require(address, namespace).status.remote(timeout_s))


def down(address: str | None = None, namespace: str = NAMESPACE, stop_cluster: bool = True) -> dict:
    """Stop every robot (corrections delivered first), delete the Serve app, kill the fleet's named actors;
    with the private local head `fleet up` started, stop it too. Returns what was stopped."""
    import ray  # lazily: fleet/cluster loads Ray only when an operation needs it (DESIGN)
    from ray import serve  # the same

    connect(_resolve(address), namespace)
    from fleet.names import ONBOARD_PREFIX

    out: dict = {"robots": [], "actors": [], "app": None, "cluster_stopped": False}
    # an added body's robots first (`fleet embodiment add`): its onboarding actor stops them, records delivered
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(ONBOARD_PREFIX):
            try:
                onboarder = ray.get_actor(entry["name"], namespace=namespace)
                final = ray.get(onboarder.stop.remote(), timeout=120)
                out["robots"] += [r for r in final.get("robots_stopped", []) if isinstance(r, dict)]
            except Exception as exc:  # noqa: BLE001 - it is killed below either way
                out.setdefault("errors", []).append(f"{entry['name']}: {type(exc).__name__}: {exc}")
    controller = _controller(namespace)
    app = None
    if controller is not None:
        try:
            app = ray.get(controller.config.remote(), timeout=30)["app_name"]
            out["robots"] += ray.get(controller.shutdown.remote(), timeout=300)
        except ray.exceptions.RayError as exc:
            out["error"] = f"controller: {exc}"
        ray.kill(controller, no_restart=True)
        out["actors"].append(CONTROLLER)
    if app is None and namespace == NAMESPACE:
        app = APP  # no controller to ask (it crashed): the default fleet's app
    # the app first: its replicas poll the head registry, which goes next
    if app is not None:
        try:
            if http_app_name(app) in serve.status().applications:  # the HTTP ingress first: it calls the app
                serve.delete(http_app_name(app))
            serve.delete(app)
            out["app"] = app
        except Exception as exc:  # noqa: BLE001 - the app may already be gone
            out["app_error"] = str(exc)

    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != namespace:
            continue
        fleet_actor = name in (REPLAY, HEADS, LEARNER) or name.startswith((ROBOT_PREFIX, GATEWAY_PREFIX))
        fleet_actor |= name.startswith(ONBOARD_PREFIX)  # a body added by `fleet embodiment add`
        if fleet_actor:
            try:
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
                out["actors"].append(name)
            except ValueError:
                pass
    for key in [k for k in _KEEP if k.startswith(f"{namespace}/")]:
        del _KEEP[key]
    try:
        state = read_state()
        if stop_cluster and state and state["address"] == ray.get_runtime_context().gcs_address:
            others = sorted(
                e["namespace"]
                for e in ray.util.list_named_actors(all_namespaces=True)
                if e["name"] == CONTROLLER and e["namespace"] != namespace  # ours may linger: kill is async
            )
            if others:  # another fleet (another `fleet up --namespace`) runs on this head: leave it up
                out["cluster_kept_for"] = others
            else:
                ray.shutdown()
                out["cluster_stopped"] = stop_local_head(state)
    except LocalHeadError as exc:
        raise FleetError(str(exc)) from None
    return out
