"""The batched policy server: `fleet.serving.runtime.PolicyRuntime` as a Ray Serve deployment.

    from ray import serve
    from deployments.policy import build_app
    handle = serve.run(build_app({"checkpoint": "fleet/checkpoints/policy", "num_replicas": 2}), name="fleet")
    reply = handle.act.remote(make_request("r0", "franka", obs)).result()   # one robot's request

Requests from every robot and embodiment are batched by `@serve.batch`; the backbone runs once per
batch. Serve receives requests on its own loop thread, so the next batch queues while one computes.
The forward runs on the user loop by default, not in a worker thread: a forward thread fights request
intake for the GIL on every torch op, and on 2 cores that kept batches at ~1 row and halved the served
calls/s (config `forward_thread=True` brings the thread back, for models made of few large kernels).
Config `backend` ("torch" | "onnx"), `precision` ("fp32" | "bf16" | "int8") and `encoder_cache` choose how
each replica runs the model (fleet/policy/inference/backend.py; `fleet bench infer` measures them).
Each replica polls the HeadRegistry actor and installs newer head versions between batches (hot swap,
no request dropped).
A malformed request is answered `{"error": "<field>: <problem>", "request_id"}`; it never fails a batch.
Each replica also listens on a direct socket (fleet/serving/direct.py, config `direct`): robots on its node send
frames there, skipping the Serve handle's hops, and those requests join the same `@serve.batch` queue.
The replica reports the socket's address to the head registry with its head versions every 2 s.
Closed-loop robots are gathered into one batch (config `gather_s`, `_plan_next_batch`). A robot alone on
the socket routes skips the queue's hand-offs (`act_one`): its batch of one runs at once, as the queue would run it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve
from ray.serve import Application

from fleet.policy.openmp import set_omp_wait_policy
from fleet.serving.config import ServeConfig
from fleet.serving.direct import DirectLimits, DirectServer, fleet_token
from fleet.serving.openpi import OpenpiServer, batch_queue_depth

logger = logging.getLogger("ray.serve")
REPORT_EVERY_S = 2.0
# how often a replica tells the registry it is alive, what it serves and where its direct socket is
MAX_REFUSED = 64
# refused head versions a replica remembers (and reports); the oldest are forgotten


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,
    health_check_period_s=5,
    # a log line per request costs more CPU than routing it; errors and warnings are still logged
    logging_config={"enable_access_log": False},
)
class PolicyServer:
    def __init__(self, config: dict | None = None) -> None:
        set_omp_wait_policy()  # before torch loads (fleet.serving.runtime imports it): a replica waits passively
        from fleet.serving.runtime import PolicyRuntime  # torch, after the line above (and not in the driver)

        self.config = cfg = ServeConfig.from_dict(config)
        self.runtime = PolicyRuntime(
            cfg.checkpoint,
            threads=cfg.threads,
            max_batch=cfg.max_batch_size,
            backend=cfg.backend,
            precision=cfg.precision,
            encoder_cache=cfg.encoder_cache_robots if cfg.encoder_cache else False,
            device=cfg.device,
            cuda_graphs=cfg.cuda_graphs,
        )
        try:
            self.runtime.replica_id = f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}"
        except Exception:  # noqa: BLE001 - outside Serve (a unit test of the class): keep host:pid
            pass
        self.act.set_max_batch_size(cfg.max_batch_size)
        self.act.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._batch_plan = (cfg.max_batch_size, cfg.batch_wait_timeout_s)  # what the queue is set to now
        # one model thread: batches and head swaps run in arrival order and never overlap
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._swap_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-swap")
        self._refused: dict[tuple[str, int], str] = {}  # (head, version) -> why this replica will not install it
        self._adapters_refused = -1  # version of an image-adapter table this replica refused: not asked again
        self._poll_error: str | None = None
        self._seen: dict[str, float] = {}  # robot_id -> when it last asked (the gather target)
        self._endpoint: dict | None = None
        self._direct = self._make_direct(cfg) if cfg.direct else None
        self._direct_ready = asyncio.get_running_loop().create_task(self._start_direct()) if cfg.direct else None
        self._poller = asyncio.get_running_loop().create_task(self._poll_heads()) if cfg.registry else None
        self._openpi = self._openpi_ready = None  # openpi's websocket protocol, same batches (fleet/serving/openpi.py)
        if cfg.openpi_port is not None:
            specs, versions = self.runtime.model.specs, self.runtime.head_versions
            self._openpi = OpenpiServer(self.act_one, specs, versions, cfg.auth_token, act_now=self.act_inline)
            start = self._openpi.start(cfg.openpi_host, cfg.openpi_port, reuse_port=True)
            self._openpi_ready = asyncio.get_running_loop().create_task(start)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def act(self, requests: list[dict]) -> list[dict]:
        """One act request in, one reply out (see fleet.protocol); batched across callers. A reply with
        an "error" key is a rejection ("<field>: <problem>"); robots treat it as a failed call."""
        if not self.config.forward_thread:
            replies = self.runtime.act_batch(requests)
        else:
            loop = asyncio.get_running_loop()
            replies = await loop.run_in_executor(self._model_thread, self.runtime.act_batch, requests)
        self._plan_next_batch(requests)
        return replies

    async def act_one(self, request: dict) -> dict:
        """The socket routes' way in (direct, openpi): the batch of one `act_inline` runs now, else `act`."""
        reply = self.act_inline(request)
        return reply if reply is not None else await self.act(request)

    def act_inline(self, request: dict) -> dict | None:
        """The reply computed here and now when this replica's batch would take the request alone and at once
        (one robot active, no wait configured, nothing queued, the forward on this loop); None otherwise, and
        the request must join the queue (`act`). The reply is the batch of one `act` would compute, minus the
        queue's hand-offs (about 0.5 ms of a 22 ms call at one robot on 2 cores, measured outside the forward)."""
        cfg = self.config
        if cfg.forward_thread or cfg.batch_wait_timeout_s > 0 or batch_queue_depth(self.act) != 0:
            return None
        robot = request.get("robot_id") if isinstance(request, dict) else None
        now = time.monotonic()
        if any(k != robot and now - t <= cfg.active_window_s for k, t in self._seen.items()):
            return None
        reply = self.runtime.act_batch([request])[0]
        self._plan_next_batch([request])
        return reply

    def _plan_next_batch(self, requests: list[dict]) -> None:
        """Gather: the next batch leaves once every recently active robot is in it, or after gather_s.

        Closed-loop robots otherwise settle into two groups that alternate, each batch half the robots:
        the answered group asks again a round trip after its batch ended, when the other group's batch has
        already left. One robot alone (target 1) never waits."""
        cfg = self.config
        now = time.monotonic()
        for r in requests:
            if isinstance(r, dict) and isinstance(r.get("robot_id"), str):
                self._seen[r["robot_id"]] = now
        self._seen = {k: t for k, t in self._seen.items() if now - t <= cfg.active_window_s}
        if cfg.gather_s <= 0:
            return
        target = max(1, min(cfg.max_batch_size, len(self._seen)))
        plan = (target, max(cfg.batch_wait_timeout_s, cfg.gather_s if target > 1 else 0.0))
        if plan != self._batch_plan:  # Serve's setters look up the replica context: only on a change
            self._batch_plan = plan
            self.act.set_max_batch_size(plan[0])
            self.act.set_batch_wait_timeout_s(plan[1])

    def _make_direct(self, cfg: ServeConfig) -> DirectServer:
        """The direct socket, with the fleet's token (or, on a cluster without one, a secret of this replica
        that robots read from its endpoint in the registry) and the config's limits."""
        token = cfg.direct_token or fleet_token()
        self._direct_secret = None if token else secrets.token_hex(16)
        limits = DirectLimits(
            max_connections=cfg.direct_max_connections,
            max_in_flight_per_connection=cfg.direct_max_in_flight,
            max_in_flight=cfg.ongoing_limit,
            request_timeout_s=cfg.direct_request_timeout_s,
        )
        return DirectServer(self.act_one, token or self._direct_secret, limits)

    async def _start_direct(self) -> None:
        host, port = await self._direct.start(self.config.direct_host, 0)
        self._endpoint = {
            "host": host,
            "port": port,
            "node_id": ray.get_runtime_context().get_node_id(),
            "replica": self.runtime.replica_id,
        }
        if self._direct_secret is not None:
            self._endpoint["token"] = self._direct_secret
        logger.info("direct route listening on %s:%d", host, port)

    async def endpoint(self) -> dict | None:
        """{"host", "port", "node_id", "replica"} of this replica's direct socket (None: config direct=False)."""
        if self._direct_ready is None:
            return None
        await asyncio.shield(self._direct_ready)
        return dict(self._endpoint)

    async def head_versions(self) -> dict[str, int]:
        return self.runtime.head_versions()

    async def stats(self) -> dict:
        direct = self._direct
        return self.runtime.stats() | {
            "queue_depth": batch_queue_depth(self.act),
            "openpi": None if self._openpi is None else self._openpi.stats(),
            "hot_swap_error": self._poll_error,
            "refused_heads": self._refused_list(),
            "direct": None if direct is None else {"endpoint": self._public_endpoint()} | direct.stats(),
        }

    def _public_endpoint(self) -> dict | None:
        return None if self._endpoint is None else {k: v for k, v in self._endpoint.items() if k != "token"}

    def _refused_list(self) -> list[dict]:
        return [{"embodiment": n, "version": v, "error": why} for (n, v), why in sorted(self._refused.items())]

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises: a broken model or a dead head poller. A head this
        replica refused is not a reason: it keeps serving the head it has (stats()["refused_heads"])."""
        health = self.runtime.health()
        if not health["ok"]:
            raise RuntimeError(f"policy runtime unhealthy: {health['last_error']}")
        if self._poller is not None and self._poller.done():
            raise RuntimeError(f"head poller stopped: {self._poller.exception()!r}")
        if self._direct_ready is not None and self._direct_ready.done() and self._direct_ready.exception():
            raise RuntimeError(f"direct route failed to start: {self._direct_ready.exception()!r}")
        if self._openpi_ready is not None and self._openpi_ready.done() and self._openpi_ready.exception():
            raise RuntimeError(f"openpi endpoint failed to start: {self._openpi_ready.exception()!r}")

    # ----- hot swap ------------------------------------------------------------------------------
    async def _poll_heads(self) -> None:
        """Every poll_interval_s: ask the registry for its latest versions, install the newer ones."""
        cfg = self.config
        registry = None
        reported = 0.0
        while True:
            wait = cfg.poll_interval_s
            try:
                if registry is None:
                    registry = ray.get_actor(cfg.registry, namespace=cfg.registry_namespace)
                latest = await registry.latest.remote()
                changed = await self._install_newer(registry, latest)
                changed |= await self._install_image_adapters(registry)
                if changed or time.monotonic() - reported >= REPORT_EVERY_S:
                    # also how robots find this replica's direct socket (HeadStore.endpoints), and how the
                    # learner learns that a head was installed everywhere or refused somewhere
                    registry.report_serving.remote(
                        self.runtime.replica_id, self.runtime.head_versions(), self._endpoint, self._refused_list()
                    )
                    reported = time.monotonic()
                self._poll_error = None
            except ValueError as exc:  # the registry actor does not exist (yet): look again next time
                registry, self._poll_error = None, f"registry {cfg.registry!r}: {exc}"
                wait = max(wait, 1.0)  # get_actor blocks the loop briefly: do not hammer the GCS
            except ray.exceptions.RayError as exc:  # it died or restarts: look it up by name again
                registry, self._poll_error = None, f"registry {cfg.registry!r}: {type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - anything else: the poller (and so the replica) must live on
                self._poll_error = f"head poll: {type(exc).__name__}: {exc}"
                logger.exception("head poll failed; trying again")
                wait = max(wait, 1.0)
            await asyncio.sleep(wait)

    async def _install_image_adapters(self, registry) -> bool:
        """The robots' image adapters, when the registry's table changed (one small reply otherwise)."""
        known = max(self.runtime.image_adapters_version, self._adapters_refused)
        got = await registry.image_adapters.remote(known)
        if got is None:
            return False
        try:
            self.runtime.set_image_adapters(got["adapters"], got["version"])
            logger.info("image adapters v%d: %d robots", got["version"], len(got["adapters"]))
        except (ValueError, KeyError, TypeError) as exc:  # a table that does not validate: keep the old one
            self._adapters_refused = int(got.get("version", 0)) if isinstance(got, dict) else 0
            logger.error("refused image adapters v%s: %s", self._adapters_refused, exc)
        return True

    async def _install_newer(self, registry, latest: dict[str, int]) -> bool:
        loop = asyncio.get_running_loop()
        serving = self.runtime.head_versions()
        changed = False
        for name, version in latest.items():
            if (name in serving and version <= serving[name]) or (name, version) in self._refused:
                continue
            try:
                version, payload = await registry.get.remote(name, version)
                if name not in serving:  # a body added to the running fleet (`fleet embodiment add`): learn it
                    from fleet.policy.extend import add_to_runtime

                    add_to_runtime(self.runtime, payload)
                elif not self.runtime.backend.shares_model:
                    # the backend rebuilds its own form of the head (an ONNX export takes seconds): off the loop,
                    # so batches keep being served by the old head until the brief install under the forward lock
                    await loop.run_in_executor(self._swap_thread, self.runtime.set_head, name, version, payload)
                elif self.config.forward_thread:
                    await loop.run_in_executor(self._model_thread, self.runtime.set_head, name, version, payload)
                else:  # between two batches of this loop: the swap is atomic by construction
                    self.runtime.set_head(name, version, payload)
                changed = True
                logger.info("installed head %s v%d", name, version)
            except ray.exceptions.RayError:
                raise  # the registry is away: the poll loop looks it up again
            except Exception as exc:  # noqa: BLE001 - a payload that does not fit: keep the old head, never retry
                why = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                self._refused[(name, version)] = why
                while len(self._refused) > MAX_REFUSED:
                    self._refused.pop(next(iter(self._refused)))
                changed = True  # report the refusal now
                logger.error("refused head %s v%d: %s", name, version, why)
        return changed


def policy_deployment(config: dict | ServeConfig | None = None):
    """PolicyServer with replicas, autoscaling, CPUs and in-flight limit taken from the config."""
    cfg = ServeConfig.from_dict(config)
    options: dict = {
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        "max_ongoing_requests": cfg.ongoing_limit,
    }
    if cfg.replica_resources:
        options["ray_actor_options"]["resources"] = dict(cfg.replica_resources)
    if cfg.autoscaling:
        options["autoscaling_config"] = dict(cfg.autoscaling)
    else:
        options["num_replicas"] = cfg.num_replicas
    return PolicyServer.options(**options)


def build_app(config: dict | ServeConfig | None = None) -> Application:
    """The policy server application (keys: fleet.serving.config.ServeConfig); run it with serve.run."""
    cfg = ServeConfig.from_dict(config)
    return policy_deployment(cfg).bind(cfg.to_dict())


app = PolicyServer.bind()
