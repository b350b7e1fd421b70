"""`FleetConfig`: what `fleet up` starts, validated field by field (no Ray).

    from fleet.cluster.config import FleetConfig
    FleetConfig(robots={"franka": 2, "hello": 1}, realtime=False)
    FleetConfig.from_file("fleet.yaml")          # JSON or YAML; unknown keys are refused

fleet/cluster/launcher.py brings a fleet up from one (connect / up / scale / status / down).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NoReturn

from fleet.embodiments import EMBODIMENTS
from fleet.learning.learner import LearnerConfig
from fleet.names import APP, NAMESPACE
from fleet.sim import parse_shift
from fleet.validate import check_bool, check_choice, check_int, check_number, check_str, fail, is_int, is_number

ROUTES = ("direct", "gateway", "handle", "none")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(name: str, expected: str, got: object) -> NoReturn:
    fail(f"FleetConfig.{name}", expected, got)


FLEET_ROBOT_KEYS = ("robot_id", "embodiment", "seed", "shift", "realtime", "teleop")
# the RobotConfig fields the fleet sets for each robot (FleetConfig.robot may not)


@dataclass(frozen=True)
class FleetConfig:
    """What `fleet up` starts. `from_file` reads it from JSON or YAML; unknown keys are refused."""

    robots: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EMBODIMENTS, 1))
    # embodiment -> number of robots
    checkpoint: str | None = None
    # policy checkpoint prefix or directory; None = the shipped fleet/checkpoints/policy
    replicas: int = 1
    # PolicyServer replicas
    replica_cpus: float = 1.0
    # Ray CPUs per replica
    realtime: bool = True
    # robots hold their embodiment's control rate (False: sim mode, as fast as the policy answers)
    shift: dict[str, str] = field(default_factory=dict)
    # embodiment -> simulator shift for all its robots, e.g. {"franka": "actuator_bias"}
    address: str | None = None
    # Ray to join ("auto", "host:port", "ray://host:10001"); None = start a private local head
    namespace: str = NAMESPACE
    # Ray namespace of every named actor of this fleet
    app_name: str = APP
    # Serve application name of the policy server
    log_dir: str = "runs/fleet"
    # durable corrections (log_dir/corrections) and published heads (log_dir/heads)
    seed: int = 0
    # robot i of an embodiment runs episode seeds derived from (seed, embodiment, i)
    teleop: bool = True
    # a scripted human reviews and corrects every robot's chunks
    route: str = "direct"
    # how robots reach the server: "direct" (a TCP connection to a replica, the gateway as fallback),
    # "gateway" (a forwarding actor per node), "handle" (own Serve handle), "none"
    robot_cpus: float = 0.05
    # Ray CPUs per robot actor
    robot_resources: dict[str, float] = field(default_factory=dict)
    # extra Ray resources per robot, e.g. {"robot": 1} on a cluster whose robot nodes offer "robot"
    spread: bool = True
    # spread robots over nodes (Ray's SPREAD strategy) instead of packing them
    server: dict = field(default_factory=dict)
    # extra fleet.serving.config.ServeConfig keys for the policy server, e.g. {"max_batch_size": 32}
    num_cpus: int | None = None
    # CPUs of the private local head; None = enough for the fleet (at least this machine's cores)
    object_store_mb: int = 256
    # object store of the private local head (requests and replies are small)
    detach: bool = False
    # keep the fleet running after the `fleet up` process exits (detached actors)
    adapt: bool = False
    # run the learner: adapt heads from the fleet's corrections, publish them, roll back success drops
    adapt_every: int = 50
    # new corrections of one embodiment per adaptation round
    learner: dict = field(default_factory=dict)
    # extra fleet.learning.learner.LearnerConfig keys, e.g. {"adapt": {"steps": 100}, "watch_episodes": 20}
    robot: dict = field(default_factory=dict)
    # extra fleet.robot.RobotConfig keys for every robot, e.g. {"aggregate": "rtc"} (with a checkpoint from
    # `fleet rtc-finetune`); the fleet sets robot_id, embodiment, seed, shift, realtime and teleop itself
    learner_cpus: float = 1.0
    # Ray CPUs of the learner actor
    endpoint_host: str = "127.0.0.1"
    # where the HTTP ingress, the openpi endpoint and the metrics endpoint listen; loopback unless told otherwise
    http_port: int | None = 8000
    # HTTP ingress for outside robots (deployments/http.py, on Serve's proxy); 0 = any free port, None = none
    openpi_port: int | None = 8001
    # openpi-compatible websocket endpoint (fleet/serving/openpi.py, in every replica); 0 = any free port, None = none
    metrics_port: int | None = 8002
    # Prometheus metrics at /metrics (fleet/metrics.py, served by the controller); 0 = any free port, None = none
    api_token: str | None = None
    # the token every endpoint takes; None = the fleet's own (~/.cache/fleet/api_token, made once, mode 0600)
    require_token: bool = True
    # False: the endpoints take no token (refused unless endpoint_host is a loopback address)

    def __post_init__(self) -> None:
        object.__setattr__(self, "robots", self._checked_robots())
        object.__setattr__(self, "shift", self._checked_shift())
        self._check_scalars()
        self._check_mappings()

    def _checked_robots(self) -> dict[str, int]:
        if not isinstance(self.robots, dict) or not self.robots:
            _fail("robots", "a non-empty mapping embodiment -> count, e.g. {'franka': 2}", self.robots)
        for name, count in self.robots.items():
            if name not in EMBODIMENTS:
                _fail("robots", f"embodiment names from {sorted(EMBODIMENTS)}", name)
            check_int("FleetConfig.robots", count, 0, 1000, expected=f"a count in [0, 1000] for {name!r}")
        return dict(self.robots)

    def _checked_shift(self) -> dict[str, str]:
        if not isinstance(self.shift, dict):
            _fail("shift", "a mapping embodiment -> shift name", self.shift)
        for name, shift in self.shift.items():
            if name not in EMBODIMENTS:
                _fail("shift", f"embodiment names from {sorted(EMBODIMENTS)}", name)
            try:
                parse_shift(shift)
            except ValueError as exc:
                raise ValueError(f"FleetConfig.shift[{name!r}]: {exc}") from None
        return dict(self.shift)

    def _check_scalars(self) -> None:
        for name in ("replicas", "object_store_mb"):
            check_int(f"FleetConfig.{name}", getattr(self, name), lo=1, expected="a positive int")
        if self.object_store_mb < 80:
            _fail("object_store_mb", "at least 80 (Ray's minimum object store)", self.object_store_mb)
        if self.num_cpus is not None and not is_int(self.num_cpus):
            _fail("num_cpus", "None or a positive int", self.num_cpus)
        for name in ("replica_cpus", "robot_cpus", "learner_cpus"):
            check_number(f"FleetConfig.{name}", getattr(self, name), 0, 64, expected="a number of CPUs in [0, 64]")
        check_choice("FleetConfig.route", self.route, ROUTES)
        for name in ("namespace", "app_name", "log_dir"):
            check_str(f"FleetConfig.{name}", getattr(self, name))
        check_int("FleetConfig.seed", self.seed, lo=0, expected="a non-negative int")
        check_bool("FleetConfig.adapt", self.adapt)
        self._check_endpoints()
        check_int("FleetConfig.adapt_every", self.adapt_every, lo=1, expected="a positive int")

    def _check_endpoints(self) -> None:
        check_str("FleetConfig.endpoint_host", self.endpoint_host)
        for name in ("http_port", "openpi_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None:
                check_int(f"FleetConfig.{name}", port, 0, 65535, expected="None (off), 0 (any free port) or a port")
        ports = [p for p in (self.http_port, self.openpi_port, self.metrics_port) if p]
        if len(ports) != len(set(ports)):
            _fail("http_port", "three different ports for http, openpi and metrics", ports)
        if self.api_token is not None and not (isinstance(self.api_token, str) and self.api_token.strip()):
            _fail("api_token", "None or a non-empty string", "(hidden)")
        check_bool("FleetConfig.require_token", self.require_token)
        if not self.require_token and not is_loopback(self.endpoint_host):
            _fail("require_token", "True when endpoint_host is not a loopback address", self.require_token)

    def _check_robot(self) -> None:
        from fleet.robot.config import RobotConfig

        if not isinstance(self.robot, dict):
            _fail("robot", "a mapping of fleet.robot.RobotConfig keys", self.robot)
        known = {f.name for f in fields(RobotConfig)} - set(FLEET_ROBOT_KEYS)
        unknown = sorted(set(self.robot) - known)
        if unknown:
            _fail("robot", f"RobotConfig keys the fleet does not set itself ({', '.join(sorted(known))})", unknown)
        try:
            RobotConfig("check", next(iter(EMBODIMENTS)), **self.robot)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FleetConfig.robot: {exc}") from None

    def _check_mappings(self) -> None:
        res = self.robot_resources
        if not isinstance(res, dict) or not all(isinstance(k, str) and is_number(v) and v >= 0 for k, v in res.items()):
            _fail("robot_resources", "a mapping resource name -> non-negative amount", res)
        if not isinstance(self.server, dict):
            _fail("server", "a mapping of fleet.serving.config.ServeConfig keys", self.server)
        if not isinstance(self.learner, dict):
            _fail("learner", "a mapping of fleet.learning.learner.LearnerConfig keys", self.learner)
        self._check_robot()
        try:
            LearnerConfig.from_dict(self.learner_config())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FleetConfig.learner: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict) -> FleetConfig:
        if not isinstance(d, dict):
            raise ValueError(f"fleet config: expected a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"fleet config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FleetConfig:
        """Read a .json, .yaml or .yml file (YAML through PyYAML, which Ray depends on)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ValueError(f"fleet config {p}: cannot read ({exc.strerror})") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # PyYAML comes with Ray, not as a dependency of its own: only a YAML file needs it

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear message
            raise ValueError(f"fleet config {p}: not valid {p.suffix.lstrip('.') or 'json'}: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return asdict(self)

    def learner_config(self) -> dict:
        """The LearnerConfig dict of this fleet's learner: `learner` plus every = adapt_every."""
        return {"every": self.adapt_every} | dict(self.learner)

    def with_(self, **changes) -> FleetConfig:
        return FleetConfig.from_dict(self.to_dict() | changes)

    @property
    def cluster_cpus(self) -> int:
        """Logical CPUs a private head needs for this fleet."""
        need = self.replicas * self.replica_cpus + sum(self.robots.values()) * self.robot_cpus + 1.0
        need += self.learner_cpus if self.adapt else 0.0
        need += 0.1 if self.http_port is not None else 0.0  # the HTTP ingress replica
        return self.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
