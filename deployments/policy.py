"""The batched policy server: `fleet.serving.PolicyRuntime` as a Ray Serve deployment.

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
each replica runs the model (fleet/policy/backend.py; `fleet bench infer` measures them).
Each replica polls the HeadRegistry actor and installs newer head versions between batches (hot swap,
no request dropped).
A malformed request is answered `{"error": "<field>: <problem>", "request_id"}`; it never fails a batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve
from ray.serve import Application

from fleet.serving import PolicyRuntime, ServeConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=128,
    health_check_period_s=5,
    # a log line per request costs more CPU than routing it; errors and warnings are still logged
    logging_config={"enable_access_log": False},
)
class PolicyServer:
    def __init__(self, config: dict | None = None) -> None:
        self.config = cfg = ServeConfig.from_dict(config)
        self.runtime = PolicyRuntime(
            cfg.checkpoint,
            threads=cfg.threads,
            max_batch=cfg.max_batch_size,
            backend=cfg.backend,
            precision=cfg.precision,
            encoder_cache=cfg.encoder_cache_robots if cfg.encoder_cache else False,
        )
        try:
            self.runtime.replica_id = f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}"
        except Exception:  # noqa: BLE001 - outside Serve (a unit test of the class): keep host:pid
            pass
        self.act.set_max_batch_size(cfg.max_batch_size)
        self.act.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # one model thread: batches and head swaps run in arrival order and never overlap
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._swap_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-swap")
        self._refused: set[tuple[str, int]] = set()
        self._poll_error: str | None = None
        self._poller = asyncio.get_running_loop().create_task(self._poll_heads()) if cfg.registry else None

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def act(self, requests: list[dict]) -> list[dict]:
        """One act request in, one reply out (see fleet.protocol); batched across callers. A reply with
        an "error" key is a rejection ("<field>: <problem>"); robots treat it as a failed call."""
        if not self.config.forward_thread:
            return self.runtime.act_batch(requests)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self.runtime.act_batch, requests)

    async def head_versions(self) -> dict[str, int]:
        return self.runtime.head_versions()

    async def stats(self) -> dict:
        return self.runtime.stats() | {"hot_swap_error": self._poll_error}

    async def check_health(self) -> None:
        """Serve restarts the replica when this raises: a broken model or a dead head poller."""
        health = self.runtime.health()
        if not health["ok"]:
            raise RuntimeError(f"policy runtime unhealthy: {health['last_error']}")
        if self._poller is not None and self._poller.done():
            raise RuntimeError(f"head poller stopped: {self._poller.exception()!r}")

    # ----- hot swap ------------------------------------------------------------------------------
    async def _poll_heads(self) -> None:
        """Every poll_interval_s: ask the registry for its latest versions, install the newer ones."""
        cfg = self.config
        registry = None
        while True:
            wait = cfg.poll_interval_s
            try:
                if registry is None:
                    registry = ray.get_actor(cfg.registry, namespace=cfg.registry_namespace)
                latest = await registry.latest.remote()
                if await self._install_newer(registry, latest):
                    registry.report_serving.remote(self.runtime.replica_id, self.runtime.head_versions())
                self._poll_error = None
            except ValueError as exc:  # the registry actor does not exist (yet): look again next time
                registry, self._poll_error = None, f"registry {cfg.registry!r}: {exc}"
                wait = max(wait, 1.0)  # get_actor blocks the loop briefly: do not hammer the GCS
            except ray.exceptions.RayError as exc:  # it died or restarts: look it up by name again
                registry, self._poll_error = None, f"registry {cfg.registry!r}: {type(exc).__name__}: {exc}"
            await asyncio.sleep(wait)

    async def _install_newer(self, registry, latest: dict[str, int]) -> bool:
        loop = asyncio.get_running_loop()
        serving = self.runtime.head_versions()
        changed = False
        for name, version in latest.items():
            if name not in serving or version <= serving[name] or (name, version) in self._refused:
                continue
            version, payload = await registry.get.remote(name, version)
            try:
                if not self.runtime.backend.shares_model:
                    # the backend rebuilds its own form of the head (an ONNX export takes seconds): off the loop,
                    # so batches keep being served by the old head until the brief install under the forward lock
                    await loop.run_in_executor(self._swap_thread, self.runtime.set_head, name, version, payload)
                elif self.config.forward_thread:
                    await loop.run_in_executor(self._model_thread, self.runtime.set_head, name, version, payload)
                else:  # between two batches of this loop: the swap is atomic by construction
                    self.runtime.set_head(name, version, payload)
                changed = True
                logger.info("installed head %s v%d", name, version)
            except ValueError as exc:  # a payload that does not fit this model: keep the old head, never retry
                self._refused.add((name, version))
                logger.error("refused head %s v%d: %s", name, version, exc)
        return changed


def policy_deployment(config: dict | ServeConfig | None = None):
    """PolicyServer with replicas, autoscaling, CPUs and in-flight limit taken from the config."""
    cfg = ServeConfig.from_dict(config)
    options: dict = {
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
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
    """The policy server application (keys: fleet.serving.ServeConfig); run it with serve.run."""
    cfg = ServeConfig.from_dict(config)
    return policy_deployment(cfg).bind(cfg.to_dict())


app = PolicyServer.bind()
