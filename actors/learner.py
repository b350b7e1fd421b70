"""The learner actor: `fleet.learning.learner.Learner` on Ray, its loop in a background thread.

    from actors.learner import start_learner
    learner = start_learner("runs/fleet/ckpt/policy", state_dir="runs/fleet/learner",
                            registry={"name": "fleet-heads", "namespace": "fleet"},
                            replay={"name": "fleet-replay", "namespace": "fleet"},
                            config={"every": 50})
    ray.get(learner.status.remote())     # state, versions, rounds, published, rollbacks, rollouts watched
    learner.record_outcomes.remote([{"robot_id": ..., "embodiment": "franka", "head_version": 3, "success": True}])

Every `poll_interval_s` the loop asks the ReplayActor how many corrections each embodiment has; with
`every` new ones it runs a round (fleet.learning.head_adapter) and publishes an accepted head to the HeadRegistry,
which every PolicyServer replica polls. Robots send their episode outcomes here (fire and forget), which
is how a rollout that lowers success is noticed and rolled back.

A learner killed mid-round has published nothing (the candidate only lives in its memory until one
`publish` call); Ray restarts it (max_restarts=-1) and the new incarnation continues from the registry's
newest head and the cursors it saved in `state_dir`.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback

import ray

from fleet.learning.learner import Learner, LearnerConfig
from fleet.names import HEADS, LEARNER, REPLAY
from fleet.policy.default import load_policy
from fleet.policy.openmp import set_omp_wait_policy

log = logging.getLogger(__name__)

LEARNER_NUM_CPUS = 1.0
# a round keeps one core busy for a few seconds; the loop idles between rounds
DEFAULT_NAME = LEARNER


class _Remote:
    """Synchronous calls on a named actor (looked up lazily, again after it died)."""

    def __init__(self, name: str, namespace: str | None, timeout_s: float = 120.0) -> None:
        self.name, self.namespace, self.timeout_s = name, namespace, timeout_s
        self._handle = None

    def _call(self, method: str, *args):
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        try:
            return ray.get(getattr(self._handle, method).remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self._handle = None
            raise

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args: self._call(method, *args)


class _LearnerActor:
    """Methods: status, record_outcomes, history, step (only without autostart), stop, check_health."""

    def __init__(
        self,
        checkpoint: str,
        config: dict | None = None,
        registry: dict | None = None,
        replay: dict | None = None,
        state_dir: str | None = None,
        autostart: bool = True,
    ) -> None:
        set_omp_wait_policy()  # before torch loads: the learner waits passively at OpenMP barriers
        import torch  # here, after the wait policy, and off the import path: robot workers load this module

        self.config = LearnerConfig.from_dict(config)
        torch.set_num_threads(self.config.threads)
        from fleet.learning.vision_round import image_stats_of  # torch: after the wait policy, like the model

        model, meta = load_policy(checkpoint)
        registry = registry or {"name": HEADS, "namespace": None}
        replay = replay or {"name": REPLAY, "namespace": None}
        self.learner = Learner(
            model,
            _Remote(replay["name"], replay.get("namespace")),
            _Remote(registry["name"], registry.get("namespace")),
            self.config,
            state_dir=state_dir,
            log_fn=log.warning,  # rounds and rollbacks are rare and worth seeing in the driver's log
            image_stats=image_stats_of(meta),
        )
        self.started_at = time.time()
        self.loop_errors = 0
        self._lock = threading.Lock()  # one step at a time; outcomes and status take it briefly
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True) if autostart else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a failed round must not stop the learner: log, go on
                self.loop_errors += 1
                self.learner.step_failed(exc)
                log.error("learner: %s", traceback.format_exc())
                self._stop.wait(max(5.0, self.config.poll_interval_s))
                continue
            self._stop.wait(self.config.poll_interval_s)

    def _step(self) -> list[dict]:
        with self._lock:
            return self.learner.step()

    # ---- methods ---------------------------------------------------------------------------------
    def step(self) -> list[dict]:
        """One pass of the loop, synchronously (tests and tools; refused while the loop thread runs)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("step: the learner's own loop is running (created with autostart=True)")
        return self._step()

    def record_outcomes(self, outcomes: list[dict]) -> int:
        return self.learner.record_outcomes(outcomes)

    def status(self) -> dict:
        out = self.learner.status()
        return out | {"loop_errors": self.loop_errors, "uptime_s": time.time() - self.started_at}

    def history(self, embodiment: str | None = None) -> list[dict]:
        return [e for e in self.learner.history if embodiment is None or e.get("embodiment") == embodiment]

    def stop(self) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60.0)
        return True

    def check_health(self) -> bool:
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()


# threaded (max_concurrency): status and outcomes are answered while a round trains in the loop thread
LearnerActor = ray.remote(num_cpus=LEARNER_NUM_CPUS, max_restarts=-1, max_concurrency=4)(_LearnerActor)


def start_learner(
    checkpoint: str,
    *,
    config: dict | None = None,
    registry: dict | None = None,
    replay: dict | None = None,
    state_dir: str | None = None,
    name: str = DEFAULT_NAME,
    namespace: str | None = None,
    detached: bool = False,
    num_cpus: float = LEARNER_NUM_CPUS,
    autostart: bool = True,
) -> ray.actor.ActorHandle:
    """Create the named learner actor (or return the running one). Raises ValueError for a bad config."""
    LearnerConfig.from_dict(config)  # a bad config fails here, not inside the actor
    options: dict = {"name": name, "get_if_exists": True, "num_cpus": num_cpus}
    if namespace is not None:
        options["namespace"] = namespace
    if detached:
        options["lifetime"] = "detached"
    return LearnerActor.options(**options).remote(str(checkpoint), config, registry, replay, state_dir, autostart)
