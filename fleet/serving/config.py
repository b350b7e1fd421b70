"""`ServeConfig`: the validated configuration of the policy server deployments (no torch, no model code).

`deployments/policy.py` and `deployments/http.py` build their apps from it; `fleet up` passes its `server`
mapping through `ServeConfig.from_dict`, which refuses unknown keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import NoReturn

from fleet.names import HEADS
from fleet.serving.device import check_device, gpu_count
from fleet.validate import check_bool, check_choice, check_int, check_number, fail, is_number

BACKENDS = ("torch", "onnx")  # fleet.policy.inference.backend.BACKENDS (kept here so the config imports no model code)
PRECISIONS = ("fp32", "bf16", "int8")  # fleet.policy.inference.precision.PRECISIONS
DEVICE_PRECISIONS = ("fp32", "bf16", "fp16")  # fleet.policy.inference.device_backend.DEVICE_PRECISIONS


@dataclass(frozen=True)
class ServeConfig:
    """Everything `build_app` / `build_http_app` take; `from_dict` refuses unknown keys."""

    checkpoint: str | None = None
    # checkpoint prefix or directory every replica loads; None = the shipped fleet/checkpoints/policy
    num_replicas: int = 1
    # fixed replica count (ignored when autoscaling is given)
    autoscaling: dict | None = None
    # Serve autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}
    max_batch_size: int = 64
    # most requests one forward pass serves
    batch_wait_timeout_s: float = 0.0
    # how long a batch waits for more requests after its first; 0 = take what is queued now. While a
    # batch computes the next one fills anyway, so a wait only adds latency (1 ms measured +1.3 ms p50)
    forward_thread: bool = False
    # run each forward in a worker thread (True) or on the replica's user event loop (False). Serve
    # receives requests on a separate loop either way, so they queue for the next batch meanwhile; a
    # forward thread instead contends for the GIL with request intake on every torch op: measured on
    # 2 cores, batches stayed at ~1 row and served calls/s fell 2-3x. True suits a model whose forward
    # is a few large kernels (the GIL is then mostly free)
    replica_cpus: float = 1.0
    # Ray CPUs reserved per replica
    replica_resources: dict | None = None
    # custom Ray resources per replica, e.g. {"policy": 1} to place replicas on cluster.yaml's policy workers
    threads: int | None = None
    # torch intra-op threads per replica; None = the CPUs it reserves (at least 1). More threads than
    # free cores make every forward wait on descheduled threads, which costs far more than it gains
    max_ongoing_requests: int | None = None
    # in-flight requests a replica accepts; None = 2 * max_batch_size (Serve's default of 5 would cap batches)
    registry: str | None = HEADS
    # name of the HeadRegistry actor replicas poll for new head versions; None = no hot swap
    registry_namespace: str | None = None
    # its Ray namespace; None = the caller's
    poll_interval_s: float = 0.15
    # how often each replica asks the registry for newer heads (a new head serves within ~2 polls)
    auth_token: str | None = None
    # HTTP ingress: require `Authorization: Bearer <token>` when set
    max_body_bytes: int = 1 << 20
    # HTTP ingress: larger request bodies get 413
    ingress_cpus: float = 0.1
    # Ray CPUs reserved for the HTTP ingress replica (it only decodes and forwards)
    backend: str = "torch"
    # how replicas run the policy: "torch" (eager) or "onnx" (ONNX Runtime, CPU execution provider; exporting
    # the graphs adds seconds to a replica's start and to each head swap). See fleet/policy/inference/backend.py
    precision: str = "fp32"
    # "fp32", "bf16" (torch only) or "int8" (dynamic quantization of the Linear layers); `fleet bench infer`
    # measures what each buys and costs on this machine
    device: str = "cpu"
    # where replicas compute: "cpu", "cuda" or "cuda:N". A CUDA device makes each replica ask Ray for one GPU
    # (so placement and device agree) and run fleet/policy/inference/device_backend.py: the model on the GPU,
    # one transfer each way per batch, CUDA graphs per batch-size bucket; precision "fp32", "bf16" or "fp16"
    cuda_graphs: bool = True
    # on a CUDA device, replay captured CUDA graphs for the steady state (False: eager kernels on the GPU)
    encoder_cache: bool = False
    # per robot, reuse the vision encoder's image tokens while its camera frame and instruction are unchanged
    # (exact byte compare; the output is identical). Pays on static scenes, costs ~1 us per row otherwise
    encoder_cache_robots: int = 4096
    # robots the encoder cache remembers (least recently seen are evicted)
    direct: bool = True
    # each replica also listens on a TCP socket that robots of its node use instead of a Serve handle call
    # (fleet/serving/direct.py): the same batch queue, without the ~3 ms of a handle call's hops
    direct_host: str = "127.0.0.1"
    # where the direct socket listens; loopback keeps it to this node. A cluster whose robots run on other
    # nodes than the replicas can set the node's address (a private network: the token travels in clear)
    direct_token: str | None = None
    # the token a direct connection must present; None = the fleet's Ray token (fleet.serving.direct.fleet_token),
    # or, on a cluster without one, a per-replica secret listed with the replica's endpoint in the registry
    direct_max_connections: int = 256
    # open direct connections per replica; more are refused (counted in stats()["direct"]["refused"])
    direct_max_in_flight: int = 8
    # requests one direct connection may have unanswered (a robot has one); more are refused. Across
    # connections a replica holds at most max_ongoing_requests (a connection with none in flight is always let in)
    direct_request_timeout_s: float = 5.0
    # a direct request unanswered after this gets an error reply (its slot is freed)
    gather_s: float = 0.004
    # after a batch, wait up to this long for the robots that were just answered to ask again, so closed-loop
    # robots share one batch instead of splitting into two alternating half-size ones. A batch leaves as soon
    # as every robot seen in the last `active_window_s` is in it, so one robot alone never waits; 0 disables
    active_window_s: float = 1.0
    # a robot counts as active for `gather_s` when it asked within this many seconds
    openpi_port: int | None = None
    # each replica also speaks openpi's websocket protocol here (fleet/serving/openpi.py): the same batch queue;
    # replicas of a node share the port (SO_REUSEPORT). None = off; 0 = any free port (one replica). Token: auth_token
    openpi_host: str = "127.0.0.1"
    # where the openpi endpoint listens; loopback unless told otherwise

    def __post_init__(self) -> None:
        for name in ("replica_cpus", "ingress_cpus"):
            check_number(f"ServeConfig.{name}", getattr(self, name), 0, 64, expected="a number of CPUs in [0, 64]")
        if self.threads is None:
            object.__setattr__(self, "threads", max(1, int(self.replica_cpus or 1)))
        for name in (
            "num_replicas",
            "max_batch_size",
            "threads",
            "max_body_bytes",
            "encoder_cache_robots",
            "direct_max_connections",
            "direct_max_in_flight",
        ):
            check_int(f"ServeConfig.{name}", getattr(self, name), lo=1, expected="a positive int")
        if self.max_ongoing_requests is not None:
            expected = f"None or an int >= max_batch_size ({self.max_batch_size})"
            check_int(
                "ServeConfig.max_ongoing_requests", self.max_ongoing_requests, self.max_batch_size, expected=expected
            )
        for name, low, high in (("batch_wait_timeout_s", 0, 1), ("poll_interval_s", 0.01, 10)):
            self._check_seconds(name, low, high)
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            self._fail("autoscaling", "None or a Serve autoscaling_config dict")
        if self.auth_token is not None and not (isinstance(self.auth_token, str) and self.auth_token):
            self._fail("auth_token", "None or a non-empty string")  # not check_str: a token of spaces stays valid
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        check_choice("ServeConfig.backend", self.backend, BACKENDS)
        check_device("ServeConfig.device", self.device)
        check_bool("ServeConfig.cuda_graphs", self.cuda_graphs)
        if self.device != "cpu":
            if self.backend != "torch":
                self._fail("backend", f"'torch' with device {self.device!r} (ONNX Runtime here is the CPU provider)")
            check_choice("ServeConfig.precision", self.precision, DEVICE_PRECISIONS)
        else:
            check_choice("ServeConfig.precision", self.precision, PRECISIONS)
        if self.backend == "onnx" and self.precision == "bf16":
            self._fail("precision", "'fp32' or 'int8' with backend 'onnx' (bf16 runs with backend 'torch')")
        for name in ("encoder_cache", "direct"):
            check_bool(f"ServeConfig.{name}", getattr(self, name))
        if not isinstance(self.direct_host, str) or not self.direct_host:
            self._fail("direct_host", "an interface address such as '127.0.0.1'")
        if self.direct_token is not None and not (isinstance(self.direct_token, str) and self.direct_token):
            self._fail("direct_token", "None or a non-empty string")
        if self.openpi_port is not None:
            check_int("ServeConfig.openpi_port", self.openpi_port, 0, 65535, expected="None or a port in [0, 65535]")
        if not isinstance(self.openpi_host, str) or not self.openpi_host:
            self._fail("openpi_host", "an interface address such as '127.0.0.1'")
        for name, low, high in (
            ("gather_s", 0, 0.1),
            ("active_window_s", 0.01, 60),
            ("direct_request_timeout_s", 0.01, 600),
        ):
            self._check_seconds(name, low, high)
        res = self.replica_resources
        if res is not None and (
            not isinstance(res, dict) or not all(isinstance(k, str) and is_number(v) and v >= 0 for k, v in res.items())
        ):
            self._fail("replica_resources", "None or a mapping resource name -> non-negative amount")

    def _fail(self, name: str, expected: str) -> NoReturn:
        fail(f"ServeConfig.{name}", expected, getattr(self, name))

    def _check_seconds(self, name: str, low: float, high: float) -> None:
        check_number(
            f"ServeConfig.{name}", getattr(self, name), low, high, expected=f"a number of seconds in [{low}, {high}]"
        )

    @property
    def replica_gpus(self) -> int:
        """GPUs each replica reserves from Ray: 1 on a CUDA device, else 0."""
        return gpu_count(self.device)

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @classmethod
    def from_dict(cls, config: dict | ServeConfig | None) -> ServeConfig:
        if isinstance(config, ServeConfig):
            return config
        config = dict(config or {})
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ServeConfig: unknown keys {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**config)

    def to_dict(self) -> dict:
        return asdict(self)
