"""The onboarding actor: one per body added to a running fleet (`fleet embodiment add`), over
`fleet.learning.onboard_live.OnboardSession`.

    actor = start_onboarder(plan_dict, checkpoint, namespace="fleet", app="fleet-policy", fleet=fleet_config)
    ray.get(actor.status.remote())   # {"phase": "demonstrations" | "policy", "head_version", "robots", ...}

The new body's robots are ordinary robot actors (actors/robot.py, named `robot-NAME-i`), started in demonstration
mode: the operator (the scripted teleoperator in simulation) drives every tick, and every chunk goes to the fleet's
replay actor as a correction with no policy action. This actor reads the body's records from the replay store,
trains the new parts (token row, stem, head; backbone frozen) from `first_round_demos` episodes on (the first
round takes in the episodes recorded while it trains), and
publishes v1 to the head registry when a candidate clears the held-out check. Every policy replica learns the body
from the registry (deployments/policy.py, no restart); once they serve it the robots switch to the policy at their
next episode boundary, with the operator reviewing each chunk as on every other body. Their corrections keep
feeding later rounds through the replay store, and their episode outcomes come here (`record_outcomes`) for the
rollback watch. The other bodies' robots, heads and replicas are not touched: the shared things written are the
new body's head in the registry and its records in the replay store.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import OrderedDict, defaultdict
from pathlib import Path

import ray

from fleet.names import HEADS, ONBOARD_PREFIX, REPLAY, robot_name
from fleet.policy.openmp import lower_priority, set_omp_wait_policy

ONBOARD_NICENESS = 19  # the lowest CPU priority (and SCHED_IDLE); Ray starts its workers, robots and replicas, at 15
ADDED_ROBOT_NICENESS = 18
# the body's robots run below the fleet they join (15): a robot of the new body needs a few % of a core at 10 Hz,
# and the existing robots keep their share when the cores are contested (aloha's e-stop latched in 2 of 3 realtime
# onboarding runs while the new robots ran at the fleet's own priority)
SEEN_EPISODES = 20_000  # (robot, episode) keys remembered, so an episode whose records come in two reads counts once
READ_EVERY_S = 0.5  # how often the reader asks the replay store for the body's new records
TELL_EVERY_S = 5.0  # how often, once the body is served, the robots are told (again) to run the policy
ROBOT_KEYS = ("aggregate", "align", "n_samples", "teleop_tolerance", "stale_ticks", "sim_wait_s", "sim_delay_ticks")
# the fleet's RobotConfig keys (`fleet up --aggregate`, FleetConfig.robot) that the added body's robots take too


def onboarder_name(embodiment: str) -> str:
    return f"{ONBOARD_PREFIX}{embodiment}"


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)
class OnboardActor:
    def __init__(
        self,
        plan: dict,
        checkpoint: str | None,
        namespace: str,
        app: str,
        registry: str = HEADS,
        idle: bool = True,
        fleet: dict | None = None,
        added_at: float | None = None,
    ) -> None:
        """idle: also SCHED_IDLE (fleet.policy.openmp.lower_priority), for a fleet that holds control rates. A fleet
        that runs flat out keeps the cores busy, so there the actor only lowers its niceness, or it would starve.
        fleet: what the body's robots take from the fleet (route, realtime, robot_cpus, seed, log_dir, robot).
        added_at: when `fleet embodiment add` ran (time.time()); the status's timeline counts from it."""
        self.added_at = time.time() if added_at is None else float(added_at)
        # first of all, so loading torch and the checkpoint does not compete with the fleet either: training takes
        # only the cores the fleet's robots and replicas leave free
        self.niceness = lower_priority(ONBOARD_NICENESS, idle=idle)
        set_omp_wait_policy()  # before torch loads: training threads wait passively at OpenMP barriers
        import torch

        from fleet.embodiments import EMBODIMENTS, register_embodiment
        from fleet.learning.onboard_live import OnboardSession
        from fleet.learning.onboard_spec import OnboardSpec
        from fleet.policy.default import load_policy

        self.plan = OnboardSpec.from_dict(plan)
        torch.set_num_threads(self.plan.train_threads)
        # what the process runs under, read back (a platform without SCHED_IDLE keeps only the niceness)
        self.sched_idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
        spec = self.plan.spec
        if spec.name not in EMBODIMENTS:
            register_embodiment(spec)  # this process validates records and builds envs of the body
        self.namespace, self.app, self.registry_name = namespace, app, registry
        self.fleet = {"route": "handle", "realtime": False, "robot_cpus": 0.05, "seed": 0} | dict(fleet or {})
        model, _ = load_policy(checkpoint)
        model.add_embodiment(spec, like=self.plan.like)
        self.registry = ray.get_actor(registry, namespace=namespace)
        # the replay store validates the body's records against its spec (and keeps it across its restarts)
        self.replay = ray.get_actor(REPLAY, namespace=namespace)
        ray.get(self.replay.register_embodiment.remote(spec.to_dict()), timeout=60)
        self.session = OnboardSession(self.plan, model, self._publish, log=print)
        self.cursor = 0  # the replay store's cursor for this body
        self.missed = 0  # records evicted from the store's ring before this actor read them
        self.records = 0
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        # per robot: policy-driven episodes and their successes (from the robots' outcomes)
        self._policy_eps: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.outcomes = 0
        self._outcomes_lock = threading.Lock()
        self.errors = 0
        self.last_error: str | None = None
        self._robots_lock = threading.RLock()
        self.robots: dict[str, ray.actor.ActorHandle] = {}
        self.target_robots = 0
        self._told_at = -float("inf")  # when the robots were last told to run the policy
        self.scale(self.plan.robots)
        self._marks = {"robots": time.time()}  # the onboarding's timeline, with the session's marks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"onboard-{spec.name}", daemon=True)
        self._reader = threading.Thread(target=self._read, name=f"onboard-read-{spec.name}", daemon=True)
        self._reader.start()
        self._thread.start()

    # ---- robots ----------------------------------------------------------------------------------
    def _spawn(self, index: int) -> ray.actor.ActorHandle:
        from actors.robot import RobotActor

        spec, fleet = self.plan.spec, self.fleet
        name = robot_name(spec.name, index)
        config = {k: v for k, v in (fleet.get("robot") or {}).items() if k in ROBOT_KEYS} | {
            "robot_id": name,
            "embodiment": spec.name,
            "sim": self.plan.sim,
            "seed": int(fleet.get("seed") or 0) * 10_000 + index,  # `fleet up --seed` moves their scenes too
            "realtime": bool(fleet["realtime"]),
            "teleop": True,  # the operator who demonstrates also reviews the policy's chunks afterwards
            "demonstrate": self.session.phase == "demonstrations" or not self._serving(),
            "demo_noise": self.plan.demo_noise,
        }
        policy = {"route": fleet["route"], "app": self.app, "namespace": self.namespace, "registry": HEADS}
        options = {"name": name, "namespace": self.namespace, "num_cpus": fleet["robot_cpus"]}
        state_dir = str(Path(fleet["log_dir"]) / "robots") if fleet.get("log_dir") else None
        handle = RobotActor.options(**options).remote(
            config,
            policy,
            {"name": REPLAY, "namespace": self.namespace},
            outcomes={"name": onboarder_name(spec.name), "namespace": self.namespace},
            state_dir=state_dir,
            embodiment_spec=spec.to_dict(),
            niceness=ADDED_ROBOT_NICENESS,
        )
        return handle

    def scale(self, count: int) -> dict:
        """Run `count` robots of the body (`fleet scale NAME=N`): new ones get the next seeds and start in the
        body's phase; removed ones finish their episode and hand over their records first. Returns
        {"robots": count, "added": [ids], "removed": [final reports]}, as the fleet controller's scale does."""
        from fleet.validate import check_int

        check_int("scale: count", count, lo=0, hi=64)
        with self._robots_lock:
            added = []
            for i in range(count):
                name = robot_name(self.plan.spec.name, i)
                if name not in self.robots:
                    self.robots[name] = self._spawn(i)
                    added.append(name)
            removed = [n for n in self.robots if int(n.rpartition("-")[2]) >= count]
            self.target_robots = count
            handles = {n: self.robots.pop(n) for n in removed}
        ray.get([self.robots[n].ping.remote() for n in added], timeout=300)
        removed = []
        for name, handle in handles.items():
            try:
                removed.append(ray.get(handle.stop.remote(True), timeout=300))
            except Exception as exc:  # noqa: BLE001 - a robot that cannot stop cleanly is still removed
                self.last_error = f"stopping {name}: {type(exc).__name__}: {exc}"
                removed.append({"id": name, "state": "lost", "last_error": self.last_error})
            ray.kill(handle, no_restart=True)
        return {"robots": count, "added": added, "removed": removed}

    def reset_estop(self, robot_id: str) -> dict:
        """An operator's reset of one robot's latched force e-stop; ValueError naming the robots for an unknown id."""
        with self._robots_lock:
            handle = self.robots.get(robot_id)
            known = sorted(self.robots)
        if handle is None:
            raise ValueError(f"robot: expected one of {known}, got {robot_id!r}")
        return ray.get(handle.reset_estop.remote(), timeout=30)

    def record_outcomes(self, batch: list[dict]) -> int:
        """Finished episodes from the body's robots (their OutcomeSink). A policy-driven episode on one head
        version feeds the rollback watch; a demonstration names no version and is only counted."""
        with self._outcomes_lock:  # the robots' batches arrive on the actor's concurrent method threads
            return self._record(batch)

    def _record(self, batch) -> int:
        from fleet.protocol import EpisodeOutcome

        n = 0
        for raw in batch if isinstance(batch, list) else []:
            try:
                o = EpisodeOutcome.from_dict(raw)
            except (TypeError, ValueError):
                continue
            if o.embodiment != self.plan.spec.name or o.robot_id not in self.robots:
                continue  # only this body's robots: the per-robot counts stay bounded
            n += 1
            if o.head_versions:
                self._marks.setdefault("first_policy_episode", time.time())
                counts = self._policy_eps[o.robot_id]
                counts[0] += 1
                counts[1] += int(o.success)
            if o.head_version is not None:  # an episode that straddled a head swap judges neither version
                self.session.record_policy_episode(o.head_version, o.success, o.interventions)
        self.outcomes += n
        return n

    # ---- the learner -----------------------------------------------------------------------------
    def _publish(self, payload: bytes, meta: dict) -> int:
        return ray.get(self.registry.publish.remote(self.plan.spec.name, None, payload, meta))

    def _serving(self) -> bool:
        """Whether the body has a published head that every replica reports."""
        name, version = self.plan.spec.name, self.session.version
        if version < 1:
            return False
        replicas = ray.get(self.registry.serving.remote(10.0))
        return bool(replicas) and all(r["versions"].get(name, 0) >= version for r in replicas.values())

    def _pull(self) -> int:
        """The body's new records in the replay store, as training episodes."""
        from fleet.learning.onboard_live import episodes_from_corrections

        got = ray.get(self.replay.since.remote(self.plan.spec.name, self.cursor), timeout=60)
        self.cursor = int(got["cursor"])
        self.missed += int(got["missed"])
        self.records += len(got["corrections"])
        for key, episode in episodes_from_corrections(self.plan.spec.name, got["corrections"]):
            new = key not in self._seen
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > SEEN_EPISODES:
                self._seen.popitem(last=False)
            self.session.add_episode(episode, new=new)
        return len(got["corrections"])

    def _to_policy(self) -> None:
        """Tell every robot to run the policy from its next episode. Idempotent, and repeated every few seconds:
        a robot Ray restarted comes back in demonstration mode, as it was started."""
        if time.monotonic() - self._told_at < TELL_EVERY_S:
            return
        with self._robots_lock:
            robots = list(self.robots.values())
        ray.get([h.start_policy.remote() for h in robots], timeout=30)
        self._told_at = time.monotonic()

    def _read(self) -> None:
        """The reader thread: the body's records, every READ_EVERY_S, also while a round trains (the replay store
        keeps only its newest records per body, so a reader that waited for a 3-minute round would miss some)."""
        while not self._stop.is_set():
            try:
                if not self._pull():
                    self._stop.wait(READ_EVERY_S)
            except Exception as exc:  # noqa: BLE001 - keep reading; the status shows the error
                self._failed(exc)

    def _run(self) -> None:
        """The learner thread: a round when one is due, and the robots to the policy once the body is served."""
        while not self._stop.is_set():
            try:
                serving = self.session.phase == "policy" and self._serving()
                if serving:
                    self._to_policy()
                if self.session.due() and (self.session.phase == "demonstrations" or serving):
                    self.session.train_round()  # demonstrations, or the operator's corrections since the last one
                else:
                    self._stop.wait(READ_EVERY_S)
            except Exception as exc:  # noqa: BLE001 - keep onboarding; the status shows the error
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        self._stop.wait(1.0)

    # ---- status and shutdown ---------------------------------------------------------------------
    def _robot_rows(self) -> list[dict]:
        with self._robots_lock:
            robots = dict(self.robots)
        refs = {name: h.report.remote() for name, h in robots.items()}
        rows = []
        for name, ref in sorted(refs.items()):
            try:
                r = ray.get(ref, timeout=5)
            except Exception as exc:  # noqa: BLE001 - a dead or busy robot is shown, not fatal
                rows.append({"robot": name, "state": "lost", "error": f"{type(exc).__name__}: {exc}"})
                rows[-1] |= {"episodes": 0, "successes": 0, "policy_episodes": 0, "policy_successes": 0}
                continue
            eps, ok = self._policy_eps[name]
            safety = r.get("safety") or {}
            rows.append(
                {
                    "robot": name,
                    "state": r.get("state"),
                    "phase": r.get("phase"),
                    "control_hz": r.get("control_hz"),
                    "episodes": r.get("episodes") or 0,
                    "successes": r.get("successes") or 0,
                    "demo_episodes": r.get("demo_episodes") or 0,
                    "demonstrations": r.get("demonstrations") or 0,
                    "policy_episodes": eps,
                    "policy_successes": ok,
                    "corrections": r.get("interventions") or 0,
                    "records_sent": r.get("corrections_acked") or 0,
                    "estop_latched": r.get("state") == "estop",
                    "estop_trips": safety.get("estop_trips", 0),
                    "estop_resets": r.get("estop_resets", 0),
                }
            )
        return rows

    def summary(self) -> dict:
        """The body's phase in a few keys, without asking its robots, and their handles (`fleet status` shows it)."""
        s = self.session.status()
        t = s["training"]
        return {
            "phase": s["phase"],
            "head_version": s["head_version"],
            "demos": s["demos"],
            "first_round_demos": self.plan.first_round_demos,
            "training": None if t is None else {k: t[k] for k in ("round", "stage", "done", "steps")},
            "robots": sorted(self.robots),
            "handles": dict(self.robots),  # so `fleet status` reaches them without a name lookup each time
        }

    def status(self) -> dict:
        session = self.session.status()
        marks = session.pop("marks") | self._marks
        order = ("robots", "first_round", "v1", "first_policy_episode")
        return session | {
            # seconds after `fleet embodiment add`: robots demonstrating, first round started, v1, first policy episode
            "timeline": {k: round(marks[k] - self.added_at, 1) for k in order if k in marks},
            "robots": self._robot_rows(),
            "records": self.records,
            "records_missed": self.missed,
            "outcomes": self.outcomes,
            "errors": self.errors,
            "last_error": self.last_error,
            "niceness": self.niceness,
            "sched_idle": self.sched_idle,
            "plan": self.plan.to_dict(),
        }

    def stop(self) -> dict:
        """Stop the body's robots (their records delivered) and the learner; returns the last status."""
        self._stop.set()
        with self._robots_lock:
            robots, self.robots = dict(self.robots), {}
        final = []
        for name, handle in robots.items():
            try:
                final.append(ray.get(handle.stop.remote(False), timeout=60))
            except Exception as exc:  # noqa: BLE001
                final.append({"id": name, "state": "lost", "last_error": f"{type(exc).__name__}: {exc}"})
            ray.kill(handle, no_restart=True)
        self._reader.join(timeout=10)
        self._thread.join(timeout=10)
        return self.status() | {"robots_stopped": final}


def start_onboarder(
    plan: dict,
    checkpoint: str | None,
    namespace: str,
    app: str,
    fleet: dict | None = None,
    added_at: float | None = None,
) -> ray.actor.ActorHandle:
    """The onboarding actor of plan["name"] (created, or the running one). Detached: it outlives the
    `fleet embodiment add` that started it; `fleet down` stops it with the fleet's other named actors.
    fleet: the fleet's config (FleetConfig as the controller holds it): route, realtime, robot_cpus, log_dir,
    robot. A realtime fleet holds its control rates, so there the actor trains under SCHED_IDLE."""
    fleet = dict(fleet or {})
    options = {"name": onboarder_name(plan["name"]), "namespace": namespace, "get_if_exists": True}
    keep = ("route", "realtime", "robot_cpus", "seed", "log_dir", "robot")
    return OnboardActor.options(**options, lifetime="detached").remote(
        plan,
        checkpoint,
        namespace,
        app,
        idle=bool(fleet.get("realtime", True)),
        fleet={k: fleet[k] for k in keep if k in fleet},
        added_at=time.time() if added_at is None else added_at,
    )
