"""The fleet commands of `fleet`: up, scale, status, down (registered onto the main app by `register`).

fleet up                                   # private local Ray, one robot per embodiment, live table
fleet up --robots franka=4,hello=2 --sim --duration 60
fleet up --shift franka:actuator_bias --adapt   # the learner adapts the franka head as corrections come
fleet up --config fleet.yaml --detach      # keep it running; then, from any shell:
fleet status                               # table (or --json: one JSON object)
fleet scale franka=8 leap=0                # removed robots finish their episode, hand over corrections
fleet down

Endpoints `fleet up` serves outside Ray (loopback, the fleet's token from ~/.cache/fleet/api_token):
HTTP ingress 127.0.0.1:8000 (POST /v1/act), openpi websocket 127.0.0.1:8001, Prometheus 127.0.0.1:8002/metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live

from fleet.cli.fleet_table import render_table
from fleet.cli.options import JsonOpt, emit_json, fail
from fleet.cluster.config import FleetConfig
from fleet.cluster.launcher import FleetError, down, reset_estop, scale, status, up
from fleet.embodiments import EMBODIMENTS
from fleet.names import NAMESPACE, ROBOT_PREFIX
from fleet.sim import parse_shift

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray to use: 'auto', 'host:port' or 'ray://host:10001'. Default: the private Ray `fleet up` "
        "started on this machine (recorded in ~/.cache/fleet/cluster.json), else 'auto'.",
    ),
]
NamespaceOpt = Annotated[str, typer.Option("--namespace", help="Ray namespace of the fleet.")]


def parse_counts(items: list[str] | str, option: str = "--robots", added: bool = False) -> dict[str, int]:
    """'franka=2,aloha=1' (or ['franka=2', 'aloha=1']) -> {'franka': 2, 'aloha': 1}; ValueError naming the
    bad item otherwise. added: also names outside the pretrained four (a body `fleet embodiment add` gave the
    running fleet; whether it has one is the fleet's to say)."""
    if isinstance(items, str):
        items = [items]
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{option}: expected embodiment=count, e.g. franka=2,hello=1")
    counts: dict[str, int] = {}
    for part in parts:
        name, sep, count = part.partition("=")
        name, count = name.strip(), count.strip()
        if not sep:
            raise ValueError(f"{option}: {part!r} is not embodiment=count (e.g. franka=2)")
        if name not in EMBODIMENTS and not (added and name.isidentifier()):
            raise ValueError(f"{option}: unknown embodiment {name!r} in {part!r}; known: {sorted(EMBODIMENTS)}")
        if not count.isdigit():
            raise ValueError(f"{option}: the count for {name} must be an int >= 0, got {count!r}")
        if name in counts:
            raise ValueError(f"{option}: {name} is given twice")
        counts[name] = int(count)
    return counts


def parse_shifts(items: list[str]) -> dict[str, str]:
    """['franka:actuator_bias', 'hello:lighting+distractors'] -> {embodiment: shift}."""

    out: dict[str, str] = {}
    for item in items:
        name, sep, shift = item.partition(":")
        if not sep or not shift:
            raise ValueError(f"--shift: {item!r} is not embodiment:shift (e.g. franka:actuator_bias)")
        if name not in EMBODIMENTS:
            raise ValueError(f"--shift: unknown embodiment {name!r}; known: {sorted(EMBODIMENTS)}")
        try:
            parse_shift(shift)
        except ValueError as exc:
            raise ValueError(f"--shift {item!r}: {exc}") from None
        out[name] = shift
    return out


def _quiet_serve() -> None:
    """Serve logs every deployment step at INFO; the table and our own lines say what matters."""
    import ray.serve  # noqa: F401 - Ray lazily; importing Serve installs its logger, which we then turn down

    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def up_cmd(
    config: Annotated[Path | None, typer.Option("--config", help="Fleet config file (.json/.yaml).")] = None,
    robots: Annotated[
        str | None, typer.Option("--robots", help="Robots per embodiment, e.g. franka=2,aloha=1,hello=1,leap=1.")
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Join this Ray instead of starting a private local one.")
    ] = None,
    duration: Annotated[float | None, typer.Option("--duration", min=0, help="Seconds to run, then go down.")] = None,
    realtime: Annotated[
        bool | None, typer.Option("--realtime/--sim", help="Hold control rates, or run flat out.")
    ] = None,
    shift: Annotated[
        list[str] | None, typer.Option("--shift", help="embodiment:shift, repeatable, e.g. franka:actuator_bias.")
    ] = None,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="Policy checkpoint.")] = None,
    aggregate: Annotated[
        str | None,
        typer.Option(
            "--aggregate", help="Robots' execution mode (latest; rtc with a `fleet rtc-finetune` checkpoint)."
        ),
    ] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", min=1, help="Policy server replicas.")] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            help="Ray namespace of the fleet; another name runs a second fleet (its own app and runs/NAME log).",
        ),
    ] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Leave the fleet running and return.")] = False,
    adapt: Annotated[
        bool, typer.Option("--adapt", help="Run the learner: adapt heads from corrections, publish, roll back.")
    ] = False,
    adapt_every: Annotated[
        int | None, typer.Option("--adapt-every", min=1, help="Corrections of one embodiment per round (50).")
    ] = None,
    http_port: Annotated[
        int | None, typer.Option("--http-port", min=0, max=65535, help="HTTP ingress port (8000; 0 = any free one).")
    ] = None,
    no_http: Annotated[bool, typer.Option("--no-http", help="Do not start the HTTP ingress.")] = False,
    openpi_port: Annotated[
        int | None,
        typer.Option("--openpi-port", min=0, max=65535, help="openpi websocket port (8001; 0 = any free one)."),
    ] = None,
    no_openpi: Annotated[bool, typer.Option("--no-openpi", help="Do not start the openpi endpoint.")] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", min=0, max=65535, help="Prometheus /metrics port (8002; 0 = any free one)."),
    ] = None,
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="Do not serve Prometheus metrics.")] = False,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Interface the endpoints listen on (127.0.0.1; another needs a token)."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="FLEET_API_TOKEN",
            show_envvar=True,
            help="Token the endpoints take (default: ~/.cache/fleet/api_token, made once).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Read the endpoints' token from this file.")
    ] = None,
    no_token: Annotated[
        bool, typer.Option("--no-token", help="Endpoints without a token (loopback --host only).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Bring a simulated fleet up: the policy server, the replay and head actors, and the robots.

    With no --address it starts a private local Ray that `fleet status`, `fleet scale` and `fleet down`
    find from any other shell. Shows a live table until Ctrl-C or --duration, then takes the fleet down
    (unless --detach).

    Examples:
        fleet up
        fleet up --robots franka=16,aloha=16,hello=16,leap=16 --realtime
        fleet up --robots franka=2 --sim --duration 30 \\
            --shift franka:actuator_bias
        fleet up --shift franka:actuator_bias --adapt    # heads adapt: v2, v3
        fleet up --config fleet.yaml --detach
        fleet up --openpi-port 9000 --no-http --host 10.0.0.5 \\
            --token-file ~/robot.token

    Endpoints for robots and monitoring outside Ray (their URLs in `fleet status`; each takes the token):
    the HTTP ingress (POST /v1/act, `Authorization: Bearer TOKEN`), openpi's websocket protocol (openpi-client's
    WebsocketClientPolicy(host, 8001, api_key=TOKEN)) and Prometheus metrics (/metrics, bearer token).
    """

    try:
        cfg = FleetConfig.from_file(config) if config else FleetConfig()
        changes: dict = {}
        if robots is not None:
            changes["robots"] = parse_counts(robots)
        if shift:
            changes["shift"] = cfg.shift | parse_shifts(shift)
        for key, value in (("address", address), ("realtime", realtime), ("checkpoint", checkpoint)):
            if value is not None:
                changes[key] = value
        for key, value in (("replicas", replicas), ("namespace", namespace)):
            if value is not None:
                changes[key] = value
        if aggregate is not None:
            changes["robot"] = cfg.robot | {"aggregate": aggregate}
        if namespace is not None and namespace != NAMESPACE:  # a second fleet: its own Serve app and log
            defaults = FleetConfig()
            if cfg.app_name == defaults.app_name:
                changes["app_name"] = f"{defaults.app_name}-{namespace}"
            if cfg.log_dir == defaults.log_dir:
                changes["log_dir"] = f"runs/{namespace}"
        if detach:
            changes["detach"] = True
        if adapt:
            changes["adapt"] = True
        if adapt_every is not None:
            changes["adapt_every"] = adapt_every
        changes |= endpoint_changes(
            http_port, no_http, openpi_port, no_openpi, metrics_port, no_metrics, host, token, token_file, no_token
        )
        cfg = cfg.with_(**changes) if changes else cfg
    except ValueError as exc:
        fail(str(exc))
    _quiet_serve()
    log = (lambda m: typer.echo(m, err=True)) if json_out else typer.echo
    n = sum(cfg.robots.values())
    log(f"starting {n} robots ({', '.join(f'{k}={v}' for k, v in cfg.robots.items())}) ...")
    try:
        info = up(cfg)
    except (FleetError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    log(f"fleet up on Ray {info['address']} (namespace {info['namespace']}, app {info['app']})")
    for line in endpoint_lines(info.get("endpoints")):
        log(line)
    if cfg.adapt:
        log(f"learner: adapts a head every {cfg.adapt_every} corrections of its embodiment; versions in the caption")
    if detach:
        log("detached: `fleet status` to watch it, `fleet down` to stop it")
        if json_out:
            emit_json(info)
        return
    ns = cfg.namespace
    last: dict = {}
    try:
        last = _watch(lambda: status(namespace=ns), duration)
    except KeyboardInterrupt:
        log("interrupted")
    except FleetError as exc:  # the fleet went down from elsewhere (`fleet down`)
        log(f"the fleet is gone: {exc}")
        return
    log("taking the fleet down ...")
    out = down(namespace=ns)
    log(f"stopped {len(out['robots'])} robots; Ray stopped: {out['cluster_stopped']}")
    if json_out:
        emit_json(last)


def endpoint_changes(
    http_port, no_http, openpi_port, no_openpi, metrics_port, no_metrics, host, token, token_file, no_token
) -> dict:
    """FleetConfig changes from the endpoint flags; ValueError naming a flag."""
    changes: dict = {}
    for key, port, off in (("http_port", http_port, no_http), ("openpi_port", openpi_port, no_openpi),
                           ("metrics_port", metrics_port, no_metrics)):  # fmt: skip
        if off:
            changes[key] = None
        elif port is not None:
            changes[key] = port
    if host is not None:
        changes["endpoint_host"] = host
    if sum(x is not None and x is not False for x in (token, token_file, no_token or None)) > 1:
        raise ValueError("--token / FLEET_API_TOKEN, --token-file and --no-token: give one of them")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {token_file}: cannot read ({exc.strerror})") from None
        if not token:
            raise ValueError(f"--token-file {token_file}: the file is empty")
    if token is not None:
        changes["api_token"] = token
    if no_token:
        changes["require_token"] = False
    return changes


def endpoint_lines(endpoints: dict | None) -> list[str]:
    """What `fleet up` and `fleet status` say about the endpoints, one line each that is on."""
    endpoints = endpoints or {}
    lines = []
    for key, label in (("http", "HTTP ingress"), ("openpi", "openpi websocket"), ("metrics", "Prometheus")):
        if endpoints.get(key):
            lines.append(f"{label}: {endpoints[key]}")
    return lines


def _watch(get_status, duration: float | None) -> dict:
    """Refresh a live table ~2x per second until `duration` passes (forever when None)."""

    start = time.monotonic()
    last: dict = {}
    console = Console(stderr=not sys.stdout.isatty())
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        while duration is None or time.monotonic() - start < duration:
            try:
                last = get_status()
            except FleetError:
                raise
            except Exception as exc:  # noqa: BLE001 - Ray gone or the controller killed: the fleet is down
                raise FleetError(f"{type(exc).__name__}: {exc}") from None
            live.update(render_table(last, title=f"fleet  {time.monotonic() - start:5.0f}s  (Ctrl-C to stop)"))
            time.sleep(0.5)
    return last


def scale_cmd(
    counts: Annotated[list[str], typer.Argument(help="embodiment=count ..., e.g. franka=8 leap=0.")],
    address: AddressOpt = None,
    namespace: NamespaceOpt = NAMESPACE,
    json_out: JsonOpt = False,
) -> None:
    """Set the number of robots per embodiment; embodiments not named keep theirs.

    A removed robot finishes its episode, hands its corrections to the replay actor, then stops.

    A body added with `fleet embodiment add` scales the same way (its onboarding actor starts its robots).

    Examples:
        fleet scale franka=8
        fleet scale franka=8 leap=0 --json
        fleet scale so100=2
    """

    try:
        wanted = parse_counts(counts, option="scale", added=True)
        out = scale(wanted, address=address, namespace=namespace)
    except (FleetError, ValueError) as exc:
        fail(str(exc))
    if json_out:
        emit_json(out)
        return
    removed = ", ".join(f"{r['id']} ({r.get('corrections_acked', 0)} corrections)" for r in out["removed"])
    typer.echo(f"added: {', '.join(out['added']) or 'none'}; removed: {removed or 'none'}")
    typer.echo("robots: " + ", ".join(f"{k}={v}" for k, v in out["robots"].items()))


def status_cmd(address: AddressOpt = None, namespace: NamespaceOpt = NAMESPACE, json_out: JsonOpt = False) -> None:
    """Show every robot (state, control rate, episodes, success, interventions, head version, latency)
    and the head versions the policy server serves. Works from any shell while `fleet up` runs.

    Examples:
        fleet status
        fleet status --json | jq '.robots[] | {id, success_rate}'
        fleet status --address 10.0.0.5:6379
    """

    try:
        out = status(address=address, namespace=namespace)
    except FleetError as exc:
        fail(str(exc))
    if json_out:
        emit_json(out)
        return
    Console().print(render_table(out))


def down_cmd(
    address: AddressOpt = None,
    namespace: NamespaceOpt = NAMESPACE,
    keep_cluster: Annotated[bool, typer.Option("--keep-cluster", help="Leave the private local Ray up.")] = False,
) -> None:
    """Stop every robot (their corrections are delivered first), delete the policy server and the fleet's
    actors; stop the private local Ray `fleet up` started.

    Examples:
        fleet down
        fleet down --address auto --keep-cluster
    """

    _quiet_serve()
    try:
        out = down(address=address, namespace=namespace, stop_cluster=not keep_cluster)
    except FleetError as exc:
        fail(str(exc))
    typer.echo(f"stopped {len(out['robots'])} robots, removed {len(out['actors'])} actors, app {out['app']}")
    if out["cluster_stopped"]:
        typer.echo("stopped the local Ray")
    elif out.get("cluster_kept_for"):
        typer.echo(f"left the local Ray up: fleets still run in namespaces {out['cluster_kept_for']}")


estop_app = typer.Typer(help="The robots' force e-stop: it latches until an operator resets it here.")


@estop_app.command("reset")
def estop_reset_cmd(
    robot: Annotated[str, typer.Argument(help="The robot's id as `fleet status` shows it, e.g. franka-0.")],
    address: AddressOpt = None,
    namespace: NamespaceOpt = NAMESPACE,
) -> None:
    """Reset a robot's latched force e-stop: an operator's decision, after checking the robot is clear.
    The robot moves again from its next tick, through the safety layer as always.

    Examples:
        fleet estop reset franka-0
        fleet estop reset robot-leap-1 --namespace second
    """
    robot_id = robot if robot.startswith(ROBOT_PREFIX) else ROBOT_PREFIX + robot
    try:
        out = reset_estop(robot_id, address=address, namespace=namespace)
    except FleetError as exc:
        fail(str(exc))
    typer.echo(f"{out['robot']}: e-stop reset" if out["was_latched"] else f"{out['robot']}: the e-stop was not latched")


def register(app: typer.Typer) -> None:
    """Add up, scale, status, down and estop to the `fleet` command."""
    app.command("up")(up_cmd)
    app.command("scale")(scale_cmd)
    app.command("status")(status_cmd)
    app.command("down")(down_cmd)
    app.add_typer(estop_app, name="estop")
