"""The fleet controller: the named actor that holds the desired robot counts and the robot handles.

`fleet.cluster.launcher.up` creates it as `fleet.names.CONTROLLER` in the fleet's namespace; any process that joins
the cluster finds it there (`fleet status`, `fleet scale`, `fleet down` from another shell). It creates
and owns the robot actors, so they live as long as it does, and Ray restarts a dead robot (on another
node if its node is gone). If the controller itself restarts, its robots died with it: the new
incarnation recreates them from the counts it saved in `log_dir/desired.json`.

It also serves the fleet's Prometheus metrics (fleet/metrics.py) when the config names a `metrics` endpoint: on
each scrape it gathers the robots' reports, every replica's stats, the learner's and the replay store's
status, and renders them. `status()` carries the URLs of the fleet's endpoints (`endpoints`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
from pathlib import Path

import ray

from actors.robot import RobotActor
from fleet.durable import write_text_atomic
from fleet.embodiments import EMBODIMENTS
from fleet.metrics import MetricsServer, render
from fleet.names import HEADS, LEARNER, ONBOARD_PREFIX, REPLAY, ROBOT_PREFIX, robot_name, robot_prefix
from fleet.validate import is_int

log = logging.getLogger(__name__)

STATUS_KEYS = ("id", "embodiment", "state", "control_hz", "episodes", "success_rate", "interventions")
STATUS_KEYS += ("head_version", "latency_p50_ms", "latency_p99_ms")


async def _get(ref, timeout_s: float):
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


def _checkpoint_stats(checkpoint: str) -> tuple[dict, dict]:
    """The per-embodiment feature and camera-image statistics in a checkpoint's JSON metadata (robots' novelty
    detection; `fleet robust-image-stats` adds the image ones)."""
    meta = json.loads(Path(checkpoint).with_name(Path(checkpoint).name + ".json").read_text())
    extra = meta.get("extra") or {}
    return extra.get("feature_stats") or {}, extra.get("image_stats") or {}


class _FleetController:
    """Async actor: scale, status and shutdown run concurrently with the robots' own work."""

    def __init__(self, config: dict, feature_stats: dict | None = None, image_stats: dict | None = None) -> None:
        self.cfg = config
        if config.get("checkpoint"):
            own_features, own_images = _checkpoint_stats(config["checkpoint"])
            feature_stats = own_features if feature_stats is None else feature_stats
            image_stats = own_images if image_stats is None else image_stats
        self.feature_stats = feature_stats or {}
        self.image_stats = image_stats or {}
        self.robots: dict[str, ray.actor.ActorHandle] = {}
        self._desired_path = Path(config["log_dir"]) / "desired.json"
        self.desired = self._load_desired() or dict(config["robots"])
        self._lock = asyncio.Lock()
        self._handle = None
        self._learner = None
        self._replay = None
        self._replica_stats: dict[str, tuple[float, dict]] = {}  # replica -> (when seen, its stats)
        self._metrics: MetricsServer | None = None
        self._metrics_lock = asyncio.Lock()

    # ---- desired counts --------------------------------------------------------------------------
    def _load_desired(self) -> dict | None:
        with warnings.catch_warnings():  # Ray's own implementation uses its deprecated actor_id property
            warnings.simplefilter("ignore")
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if not restarted:
            return None  # a new fleet starts from its config, not from an earlier fleet's file
        try:
            return {k: int(v) for k, v in json.loads(self._desired_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return None

    def _save_desired(self) -> None:
        write_text_atomic(self._desired_path, json.dumps(self.desired))

    # ---- robots ----------------------------------------------------------------------------------
    def _robot_options(self, name: str) -> dict:
        cfg = self.cfg
        options = {"name": name, "namespace": cfg["namespace"], "num_cpus": cfg["robot_cpus"]}
        if cfg["robot_resources"]:
            options["resources"] = dict(cfg["robot_resources"])
        if cfg["spread"]:
            options["scheduling_strategy"] = "SPREAD"
        return options

    def _spawn(self, embodiment: str, index: int) -> str:
        cfg = self.cfg
        name = robot_name(embodiment, index)
        ordinal = list(EMBODIMENTS).index(embodiment)
        robot_config = {
            "robot_id": name,
            "embodiment": embodiment,
            "seed": cfg["seed"] * 10_000 + index * 10 + ordinal,
            "shift": cfg["shift"].get(embodiment),
            "realtime": cfg["realtime"],
            "teleop": cfg["teleop"],
        } | dict(cfg.get("robot") or {})
        policy = {"route": cfg["route"], "app": cfg["app_name"], "namespace": cfg["namespace"], "registry": HEADS}
        replay = {"name": REPLAY, "namespace": cfg["namespace"]}
        # with a learner, every finished episode's outcome (and the head version it ran) goes to it
        outcomes = {"name": LEARNER, "namespace": cfg["namespace"]} if cfg.get("adapt") else None
        state_dir = str(Path(cfg["log_dir"]) / "robots")  # e-stop latches, kept across robot restarts
        self.robots[name] = RobotActor.options(**self._robot_options(name)).remote(
            robot_config,
            policy,
            replay,
            self.feature_stats.get(embodiment),
            outcomes=outcomes,
            state_dir=state_dir,
            image_stats=self.image_stats.get(embodiment),
        )
        return name

    def _indices(self, embodiment: str) -> list[int]:
        prefix = robot_prefix(embodiment)
        return sorted(int(n[len(prefix) :]) for n in self.robots if n.startswith(prefix))

    async def _remove(self, names: list[str], finish_episode: bool) -> list[dict]:
        """Stop robots (after their episode when finish_episode; corrections delivered), then kill them."""

        async def one(name: str) -> dict:
            handle = self.robots.pop(name)
            try:
                final = await _get(handle.stop.remote(finish_episode), 600.0)
            except Exception as exc:  # noqa: BLE001 - a robot that cannot stop cleanly is still removed
                final = {"id": name, "state": "lost", "last_error": f"{type(exc).__name__}: {exc}"}
            ray.kill(handle, no_restart=True)
            return final

        return list(await asyncio.gather(*(one(n) for n in names)))

    async def _reconcile(self) -> dict:
        added, removed_names = [], []
        for embodiment, want in self.desired.items():
            have = self._indices(embodiment)
            for i in range(want):
                if i not in have:
                    added.append(self._spawn(embodiment, i))
            removed_names += [robot_name(embodiment, i) for i in have if i >= want]
        removed = await self._remove(removed_names, finish_episode=True)
        try:
            await asyncio.gather(*(_get(self.robots[n].ping.remote(), 300.0) for n in added))
        except TimeoutError:
            needs = {"CPU": self.cfg["robot_cpus"]} | dict(self.cfg["robot_resources"])
            raise RuntimeError(
                f"robots {added} did not start within 300 s: does the cluster have room for {len(added)} more "
                f"robots needing {needs} each? (ray status shows what it offers)"
            ) from None
        return {"added": added, "removed": removed, "robots": dict(self.desired)}

    # ---- API -------------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        async with self._lock:
            await self._start_metrics()
            self._save_desired()
            await self._reconcile()
            return sorted(self.robots)

    async def _start_metrics(self) -> None:
        """Listen for Prometheus scrapes where the config says (`metrics`: {"host", "port"}); a restarted
        controller listens again on the same port."""
        where = self.cfg.get("metrics")
        async with self._metrics_lock:
            if not where or self._metrics is not None:
                return
            server = MetricsServer(self._scrape, token=self.cfg.get("api_token"))
            await server.start(where["host"], where["port"])
            self._metrics = server

    async def _scrape(self) -> bytes:
        return render(await self.metrics_snapshot())

    async def scale(self, counts: dict[str, int]) -> dict:
        """Set robots per embodiment; embodiments not named keep their count."""
        for name, count in counts.items():
            if name not in EMBODIMENTS or not is_int(count) or count < 0:
                raise ValueError(f"scale: {name}={count!r}: expected a known embodiment and a count >= 0")
        async with self._lock:
            self.desired |= dict(counts)
            self._save_desired()
            return await self._reconcile()

    async def reset_estop(self, robot_id: str) -> dict:
        """An operator's reset of one robot's latched force e-stop; ValueError naming the robots for an unknown id."""
        handle = self.robots.get(robot_id)
        if handle is None:
            onboarder = self._onboarder_of(robot_id)  # a robot of a body `fleet embodiment add` is onboarding
            if onboarder is not None:
                return await _get(onboarder.reset_estop.remote(robot_id), 30.0)
            raise ValueError(f"robot: expected one of {sorted(self.robots)}, got {robot_id!r}")
        return await _get(handle.reset_estop.remote(), 30.0)

    def _onboarder_of(self, robot_id: str):
        """The onboarding actor running `robot-NAME-i`, or None."""
        name = robot_id.removeprefix(ROBOT_PREFIX).rpartition("-")[0]
        if not robot_id.startswith(ROBOT_PREFIX) or not name:
            return None
        try:
            return ray.get_actor(ONBOARD_PREFIX + name, namespace=self.cfg["namespace"])
        except ValueError:
            return None

    def config(self) -> dict:
        return {k: v for k, v in self.cfg.items() if k != "api_token"} | {"desired": dict(self.desired)}

    def robot_handles(self) -> dict:
        """{robot id: actor handle} (handles are picklable: other processes can call the robots)."""
        return dict(self.robots)

    async def _heads(self, timeout_s: float) -> dict:
        try:
            if self._handle is None:
                from ray import serve  # Ray Serve (tens of MB) only once status asks for the head versions

                self._handle = serve.get_app_handle(self.cfg["app_name"])
            return await asyncio.wait_for(self._handle.head_versions.remote(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - status must answer even with the server down
            self._handle = None
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def _learner_status(self, timeout_s: float) -> dict | None:
        """The learner's status (rounds, versions published, rollouts watched), None without one."""
        if not self.cfg.get("adapt"):
            return None
        try:
            if self._learner is None:
                self._learner = ray.get_actor(LEARNER, namespace=self.cfg["namespace"])
            return await _get(self._learner.status.remote(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - status must answer even while the learner restarts
            self._learner = None
            return {"state": "unreachable", "last_error": f"{type(exc).__name__}: {exc}"}

    async def status(self, timeout_s: float = 3.0) -> dict:
        if self._metrics is None and self.cfg.get("metrics"):  # a restarted controller listens again
            try:
                await self._start_metrics()
            except OSError as exc:
                log.warning("metrics endpoint: %s", exc)
        added = await self._added_bodies(timeout_s)
        handles = dict(self.robots) | {r: h for body in added.values() for r, h in body.pop("handles").items()}

        async def one(name: str) -> dict:
            try:
                return await _get(handles[name].report.remote(), timeout_s)
            except Exception as exc:  # noqa: BLE001 - dead, restarting or busy: say so, keep the row
                state = "restarting" if isinstance(exc, ray.exceptions.RayActorError) else "unreachable"
                row = dict.fromkeys(STATUS_KEYS) | {"id": name, "embodiment": name.split("-")[1], "state": state}
                return row | {"last_error": f"{type(exc).__name__}: {exc}"}

        names = sorted(handles)
        reports, heads, learner = await asyncio.gather(
            asyncio.gather(*(one(n) for n in names)), self._heads(timeout_s), self._learner_status(timeout_s)
        )
        heads_error = heads.pop("error", None) if isinstance(heads, dict) else None
        robots = [{k: r.get(k) for k in STATUS_KEYS} | r for r in reports]
        out = {"robots": robots, "heads": heads, "desired": dict(self.desired), "app": self.cfg["app_name"]}
        out |= {"namespace": self.cfg["namespace"], "realtime": self.cfg["realtime"]}
        out["endpoints"] = dict(self.cfg.get("endpoints") or {"http": None, "openpi": None, "metrics": None})
        if heads_error:
            out["heads_error"] = heads_error
        if learner is not None:
            out["learner"] = learner
        if added:
            out["added"] = added
        return out

    async def _added_bodies(self, timeout_s: float) -> dict:
        """Bodies `fleet embodiment add` brought in: {name: the onboarding actor's summary (phase, head version,
        demonstrations) plus "handles", its robot actors}. Their robots are robot actors the controller does not
        own; `fleet status` lists them with the others."""
        out = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != self.cfg["namespace"] or not name.startswith(ONBOARD_PREFIX):
                continue
            try:
                onboarder = ray.get_actor(name, namespace=self.cfg["namespace"])
                summary = await _get(onboarder.summary.remote(), timeout_s)
                handles = summary.pop("handles")
            except Exception as exc:  # noqa: BLE001 - starting, stopping or busy: say so, keep the rest
                summary, handles = {"phase": "unreachable", "error": f"{type(exc).__name__}: {exc}"}, {}
            out[name[len(ONBOARD_PREFIX) :]] = summary | {"handles": handles}
        return out

    # ---- metrics ---------------------------------------------------------------------------------
    async def metrics_snapshot(self, timeout_s: float = 3.0) -> dict:
        """`status()` plus every serving replica's stats ("replicas") and the replay store's ("replay")."""
        status, replicas, replay = await asyncio.gather(
            self.status(timeout_s), self._replicas(timeout_s), self._replay_stats(timeout_s)
        )
        return status | {"replicas": replicas, "replay": replay}

    async def _replicas(self, timeout_s: float) -> list[dict]:
        """Stats of each replica the head registry saw in the last 10 s. A Serve handle call reaches one replica
        of Serve's choosing, so a few more calls than replicas go out at once and the answers are kept per
        replica; one not reached this time shows its last stats for up to 30 s."""
        try:
            registry = ray.get_actor(HEADS, namespace=self.cfg["namespace"])
            serving = await _get(registry.serving.remote(10.0), timeout_s)
            if self._handle is None:
                from ray import serve  # lazily, as in _heads

                self._handle = serve.get_app_handle(self.cfg["app_name"])
            calls = [self._handle.stats.remote() for _ in range(2 * len(serving) + 1)]
            answers = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s)
        except Exception as exc:  # noqa: BLE001 - metrics must answer with the server down
            log.warning("replica stats: %s", exc)
            serving, answers = {}, []
        now = time.monotonic()
        for a in answers:
            if isinstance(a, dict) and a.get("replica"):
                self._replica_stats[str(a["replica"])] = (now, a)
        self._replica_stats = {k: v for k, v in self._replica_stats.items() if now - v[0] <= 30.0}
        out = []
        for rid, (_, stats) in sorted(self._replica_stats.items()):
            versions = (serving.get(rid) or {}).get("versions")
            out.append(stats | {"head_versions": versions if versions is not None else stats.get("head_versions")})
        return out

    async def _replay_stats(self, timeout_s: float) -> dict:
        try:
            if self._replay is None:
                self._replay = ray.get_actor(REPLAY, namespace=self.cfg["namespace"])
            return await _get(self._replay.stats.remote(), timeout_s)
        except Exception as exc:  # noqa: BLE001 - metrics must answer while the replay actor restarts
            self._replay = None
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def shutdown(self) -> list[dict]:
        """Stop every robot now (the running episode is cut short; its corrections are delivered)."""
        async with self._lock:
            return await self._remove(sorted(self.robots), finish_episode=False)

    def check_health(self) -> bool:
        return True


FleetController = ray.remote(num_cpus=0, max_restarts=-1)(_FleetController)
