"""The onboarding actor: one per body added to a running fleet (`fleet embodiment add`), over
`fleet.learning.onboard_live` (OnboardSession, OnboardRobot).

    actor = start_onboarder(plan_dict, checkpoint, namespace="fleet")
    ray.get(actor.status.remote())   # {"phase": "demonstrations" | "policy", "head_version", "robots", ...}

It runs the new body's simulated robots on a thread: demonstration episodes (the operator drives, every tick
stored as a demonstration) until the session's held-out check passes and v1 is published to the head registry;
every policy replica then learns the body from the registry (deployments/policy.py, no restart) and the robots
switch to policy episodes through the Serve app, with the operator reviewing each chunk. The other bodies'
robots, heads and replicas are not touched: the only shared thing written is the new body's head in the registry.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import uuid

import ray

from fleet.names import HEADS, ONBOARD_PREFIX
from fleet.policy.openmp import lower_priority, set_omp_wait_policy

ONBOARD_NICENESS = 19  # the lowest CPU priority (and SCHED_IDLE); Ray starts its workers, robots and replicas, at 15


def onboarder_name(embodiment: str) -> str:
    return f"{ONBOARD_PREFIX}{embodiment}"


@ray.remote(num_cpus=0, max_restarts=0)
class OnboardActor:
    def __init__(
        self, plan: dict, checkpoint: str | None, namespace: str, app: str, registry: str = HEADS, idle: bool = True
    ) -> None:
        """idle: also SCHED_IDLE (fleet.policy.openmp.lower_priority), for a fleet that holds control rates. A fleet
        that runs flat out keeps the cores busy, so there the actor only lowers its niceness, or it would starve."""
        set_omp_wait_policy()  # before torch loads: training threads wait passively at OpenMP barriers
        import torch

        from fleet.embodiments import EMBODIMENTS, register_embodiment
        from fleet.learning.onboard_live import OnboardRobot, OnboardSession
        from fleet.learning.onboard_spec import OnboardSpec
        from fleet.policy.default import load_policy

        self.plan = OnboardSpec.from_dict(plan)
        torch.set_num_threads(self.plan.train_threads)
        # training takes only the cores the fleet's robots and replicas leave free
        self.niceness = lower_priority(ONBOARD_NICENESS, idle=idle)
        # what the process runs under, read back (a platform without SCHED_IDLE keeps only the niceness)
        self.sched_idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
        spec = self.plan.spec
        if spec.name not in EMBODIMENTS:
            register_embodiment(spec)  # this process validates records and builds envs of the body
        self.namespace, self.app, self.registry_name = namespace, app, registry
        model, _ = load_policy(checkpoint)
        model.add_embodiment(spec, like=self.plan.like)
        self.registry = ray.get_actor(registry, namespace=namespace)
        self.session = OnboardSession(self.plan, model, self._publish, log=print)
        self.robots = [
            OnboardRobot(f"robot-{spec.name}-{i}", spec, self.plan.sim, seed=i) for i in range(self.plan.robots)
        ]
        self.target_robots = self.plan.robots
        self.policy_calls = 0
        self.errors = 0
        self.last_error: str | None = None
        self._handle = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"onboard-{spec.name}", daemon=True)
        self._thread.start()
        self._robot_cls = OnboardRobot

    def _publish(self, payload: bytes, meta: dict) -> int:
        return ray.get(self.registry.publish.remote(self.plan.spec.name, None, payload, meta))

    def _policy(self, request: dict) -> dict:
        """One act request to the Serve app (the same deployment every other robot uses)."""
        from fleet.protocol import make_request

        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app)
        obs = request["obs"]
        req = make_request(request.get("robot_id", "onboard"), self.plan.spec.name, obs, obs_tick=request["obs_tick"])
        req["request_id"] = uuid.uuid4().hex
        reply = self._handle.act.remote(req).result(timeout_s=60)
        self.policy_calls += 1
        if "error" in reply:
            raise RuntimeError(f"policy server: {reply['error']}")
        return reply

    def _serving(self) -> bool:
        """Whether every replica reports the published version (so the first policy episode runs on it)."""
        name, version = self.plan.spec.name, self.session.version
        replicas = ray.get(self.registry.serving.remote(10.0))
        return bool(replicas) and all(r["versions"].get(name, 0) >= version for r in replicas.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # a robot whose force e-stop latched waits for an operator (`fleet estop reset ROBOT`)
                robots = [r for r in self.robots[: self.target_robots] if not r.estopped]
                if not robots:
                    time.sleep(0.2)
                    continue
                if self.session.phase == "demonstrations":
                    for robot in robots:
                        demo, _ = robot.demonstration_episode(self.plan.demo_noise)
                        self.session.add_episode(demo)
                    if self.session.due():
                        self.session.train_round()
                elif not self._serving():
                    time.sleep(0.2)  # published; waiting for the replicas to install it
                elif self.session.due():
                    self.session.train_round()  # the operator's corrections since: a later version if it passes
                else:
                    for robot in robots:
                        corrected, ok = robot.policy_episode(
                            lambda r, rid=robot.robot_id: self._policy(r | {"robot_id": rid})
                        )
                        self.session.add_episode(corrected)
                        ran_on = robot.last_episode["versions"]
                        if len(ran_on) == 1:  # an episode that straddled a head swap judges neither version
                            self.session.record_policy_episode(ran_on[0], ok, robot.last_episode["interventions"])
            except Exception as exc:  # noqa: BLE001 - keep onboarding; the status shows the error
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                time.sleep(1.0)

    def scale(self, count: int) -> int:
        """Run `count` robots of the body (new ones get the next seeds)."""
        from fleet.validate import check_int

        check_int("scale: count", count, lo=0, hi=64)
        while len(self.robots) < count:
            i = len(self.robots)
            self.robots.append(
                self._robot_cls(f"robot-{self.plan.spec.name}-{i}", self.plan.spec, self.plan.sim, seed=i)
            )
        self.target_robots = count
        return count

    def reset_estop(self, robot_id: str) -> dict:
        """An operator's reset of one robot's latched force e-stop; ValueError naming the robots for an unknown id."""
        robots = {r.robot_id: r for r in self.robots}
        if robot_id not in robots:
            raise ValueError(f"robot: expected one of {sorted(robots)}, got {robot_id!r}")
        return {"robot": robot_id, "was_latched": robots[robot_id].reset_estop()}

    def status(self) -> dict:
        return self.session.status() | {
            "robots": [r.report() for r in self.robots[: self.target_robots]],
            "policy_calls": self.policy_calls,
            "errors": self.errors,
            "last_error": self.last_error,
            "niceness": self.niceness,
            "sched_idle": self.sched_idle,
            "plan": self.plan.to_dict(),
        }

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.status()


def start_onboarder(
    plan: dict, checkpoint: str | None, namespace: str, app: str, realtime: bool = True
) -> ray.actor.ActorHandle:
    """The onboarding actor of plan["name"] (created, or the running one). Detached: it outlives the
    `fleet embodiment add` that started it; `fleet down` stops it with the fleet's other named actors.
    realtime: whether the fleet holds its control rates (then the actor trains under SCHED_IDLE)."""
    options = {"name": onboarder_name(plan["name"]), "namespace": namespace, "get_if_exists": True}
    return OnboardActor.options(**options, lifetime="detached").remote(
        plan, checkpoint, namespace, app, idle=bool(realtime)
    )
