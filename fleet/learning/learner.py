"""The learner's logic (no Ray): adapt a head every N corrections, publish it if it is no worse, watch the
rollout, roll back when the fleet's success drops. `actors/learner.py` runs it as a Ray actor.

    learner = Learner(model, replay, registry, LearnerConfig(every=50), rehearsal={"franka": demo_set})
    learner.start()          # sync with the registry: continue from the newest published head
    learner.step()           # judge rollouts; adapt every embodiment with >= every new corrections
    learner.record_outcomes([{"embodiment": "franka", "head_version": 2, "success": True, ...}])

`replay` is anything with ReplayStore's `since(embodiment, cursor)` and `counts()` (the store itself, or a
proxy of the ReplayActor); `registry` anything with HeadStore's `latest()`, `get(name, version)`,
`publish(name, version, payload, meta)` and `history(name)`.

Publishing: a round trains a candidate in memory (fleet.learning.adapt); only an accepted candidate is
published, as one `publish` call of a complete safetensors payload, which the registry writes to a
temporary file, fsyncs and renames before it answers. A learner that dies mid-round has published
nothing; the registry refuses any version not above its latest, so versions only increase, and a
restarted learner continues from the registry's newest head and its own saved cursors.

How the success signal reaches the learner: every robot reports each finished episode as
{"robot_id", "embodiment", "head_version", "success"}, where head_version is the version of every chunk
the episode ran (episodes that ran chunks of two versions carry None and are not counted). After a
rollout v -> v+1 the learner feeds a `fleet.monitor.Monitor` the newest `reference_episodes` outcomes of v
and then the outcomes of v+1; once `watch_episodes` episodes ran on v+1, a monitor `success_drop` alarm
(v+1's success more than `success_drop` below v's) that a one-sided two-proportion z-test confirms at
`significance` (so chance alone rarely reverts a good head) re-publishes v's payload as v+2 (a rollback
never reuses a number). Robots also report how often the human stepped in during the episode: with a
teleoperator rescuing every stray, a worse head shows first as more interventions per episode, so a
significant rise by more than `intervention_rise` rolls back too. While a rollout is watched, that
embodiment gets no new round (so every verdict compares exactly two versions), until `watch_timeout_s`
passes without enough episodes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fleet.durable import write_text_atomic
from fleet.learning.rollout import judge_rollout

log = logging.getLogger(__name__)

STATE_FILE = "learner_state.json"


@dataclass(frozen=True)
class LearnerConfig:
    """What the learner does and when. `from_dict` refuses unknown keys."""

    every: int = 50
    # new corrections of one embodiment that trigger a round
    max_round: int = 400
    # at most this many (the newest) new corrections in one round
    embodiments: tuple[str, ...] | None = None
    # heads the learner adapts; None = every head of the model
    poll_interval_s: float = 1.0
    # how often the loop asks the replay actor for new corrections
    rehearsal_episodes: int = 120
    # expert episodes of the unshifted simulator per embodiment for the rehearsal set (~4 samples each)
    watch_episodes: int = 20
    # episodes on a new version before its rollout is judged (10 would misjudge a steady 90 % success as a
    # 15-point drop about one time in twelve, from chance alone; 20 about one in fifty)
    reference_episodes: int = 40
    # the previous version's newest episodes it is compared with
    min_reference: int = 10
    # fewer previous-version episodes than this: the rollout cannot be judged, it is confirmed
    success_drop: float = 0.15
    # roll back when the new version's success is more than this below the previous version's ...
    significance: float = 0.05
    # ... and a one-sided two-proportion z-test says so at this level: with 20 against 40 episodes, chance
    # alone then rolls back a steady head about 2-6 % of the time, while a 30-point drop is caught 75-90 %
    intervention_rise: float = 0.5
    # also roll back when the new version needs this much more human help per episode (relative; 0.5 = half
    # as many interventions again), at least 0.5 more per episode and significant at `significance`: with a
    # human correcting every stray, a worse head shows as more interventions long before lower success
    watch_timeout_s: float = 300.0
    # a rollout watched this long without enough episodes is confirmed (rounds resume)
    threads: int = 1
    # torch intra-op threads of the learner
    adapt: dict = field(default_factory=dict)
    # fleet.learning.adapt_config.AdaptConfig keys, e.g. {"steps": 100}

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"LearnerConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("every", "max_round", "rehearsal_episodes", "watch_episodes", "reference_episodes", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "rehearsal_episodes" else 1):
                fail(name, "a positive int")
        if self.max_round < self.every:
            fail("max_round", f"an int >= every ({self.every})")
        if isinstance(self.min_reference, bool) or not isinstance(self.min_reference, int) or self.min_reference < 1:
            fail("min_reference", "a positive int")
        for name in ("poll_interval_s", "watch_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                fail(name, "a positive number of seconds")
        if isinstance(self.success_drop, bool) or not 0 < self.success_drop < 1:
            fail("success_drop", "a share in (0, 1)")
        if isinstance(self.significance, bool) or not 0 < self.significance < 1:
            fail("significance", "a level in (0, 1)")
        r = self.intervention_rise
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            fail("intervention_rise", "a positive relative rise, e.g. 0.5")
        if self.embodiments is not None:
            if isinstance(self.embodiments, str) or not all(isinstance(e, str) for e in self.embodiments):
                fail("embodiments", "None or a list of embodiment names")
            object.__setattr__(self, "embodiments", tuple(self.embodiments))
        if not isinstance(self.adapt, dict):
            fail("adapt", "a mapping of AdaptConfig keys")
        from fleet.learning.adapt_config import AdaptConfig

        AdaptConfig.from_dict(self.adapt)  # refuse bad adaptation keys now, not at the first round

    @classmethod
    def from_dict(cls, d: dict | None) -> LearnerConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LearnerConfig: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Learner:
    """Adapts, publishes, watches and rolls back the heads of `model` (the learner's own copy)."""

    def __init__(
        self,
        model,
        replay,
        registry,
        config: LearnerConfig | None = None,
        rehearsal: dict | None = None,
        state_dir: str | os.PathLike | None = None,
        log_fn=None,
    ) -> None:
        from fleet.learning.adapt_config import AdaptConfig

        self.model, self.replay, self.registry = model, replay, registry
        self.config = cfg = config or LearnerConfig()
        self.adapt_config = AdaptConfig.from_dict(cfg.adapt)
        names = cfg.embodiments if cfg.embodiments is not None else tuple(model.specs)
        unknown = [n for n in names if n not in model.specs]
        if unknown:
            have = sorted(model.specs)
            raise ValueError(f"LearnerConfig.embodiments: the model has no head for {unknown}; it has {have}")
        self.names: tuple[str, ...] = tuple(names)
        self.rehearsal = dict(rehearsal or {})
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.log = log_fn or log.info
        self.adapters: dict = {}
        self.cursors: dict[str, int] = dict.fromkeys(self.names, 0)
        self.history: list[dict] = []  # every round, publish and rollback, oldest first
        self.watch: dict[str, dict] = {}  # embodiment -> the rollout under watch
        self.outcomes: dict[str, dict[int, deque]] = {}  # embodiment -> version -> recent outcomes
        self.outcome_counts = {"received": 0, "counted": 0, "mixed": 0, "other": 0, "malformed": 0}
        # mixed: the episode ran two head versions; other: a head this learner does not adapt
        self._outcomes_lock = threading.Lock()  # robots report from other threads while a round runs
        self.state = "created"
        self.current: dict | None = None  # the round in progress: {"embodiment", "started", "corrections"}
        self.rounds = 0
        self.published = 0
        self.rollbacks = 0
        self.last_error: str | None = None
        self._load_state()

    # ---- persistence ------------------------------------------------------------------------------
    def _state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    def _load_state(self) -> None:
        path = self._state_path()
        if path is None or not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            self.cursors.update({k: int(v) for k, v in saved.get("cursors", {}).items() if k in self.cursors})
            self.history = list(saved.get("history", []))[-500:]
            self.rounds = int(saved.get("rounds", 0))
            self.published = int(saved.get("published", 0))
            self.rollbacks = int(saved.get("rollbacks", 0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            self.last_error = f"learner state {path}: unreadable, starting afresh ({exc})"

    def _save_state(self) -> None:
        path = self._state_path()
        if path is None:
            return
        state = {
            "cursors": self.cursors,
            "history": self.history[-500:],
            "rounds": self.rounds,
            "published": self.published,
            "rollbacks": self.rollbacks,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(state, default=str))

    def _event(self, kind: str, name: str, **info) -> dict:
        event = {"event": kind, "embodiment": name, "t": time.time()} | info
        self.history.append(event)
        del self.history[:-500]
        return event

    # ---- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the adapters (rehearsal memory encoded once) on the checkpoint's heads, reload the corrections
        earlier rounds learnt from, then continue from the registry's newest head of each embodiment."""
        from fleet.learning.adapt import HeadAdapter
        from fleet.learning.adapt_data import rehearsal_set
        from fleet.policy.checkpoint import head_from_bytes, head_to_bytes

        self.state = "preparing"
        latest = self.registry.latest()
        for name in self.names:
            rehearsal = self.rehearsal.get(name)
            if rehearsal is None and self.config.rehearsal_episodes > 0:
                rehearsal = rehearsal_set(name, self.config.rehearsal_episodes)
            # built on the checkpoint's head: the one the rehearsal labels (and a hardware change) refer to
            adapter = HeadAdapter(self.model, name, rehearsal, self.adapt_config)
            if self.cursors[name] > 0:  # a restart: the pools of the earlier incarnation, from the replay store
                cursor = self.cursors[name]
                got = self.replay.since(name, max(0, cursor - self.adapt_config.max_corrections))
                items = list(got["corrections"])
                first = int(got["cursor"]) - len(items)  # sequence number of items[0]
                adapter.add_earlier(items[: max(0, cursor - first)])
            self.adapters[name] = adapter
            have = int(self.model.head_versions[name])
            newest = int(latest.get(name, 0))
            if newest > have:
                version, payload = self.registry.get(name, newest)
                head_from_bytes(self.model, name, payload)
                self.model.head_versions[name] = int(version)  # the registry's number is authoritative
                self.log(f"learner: {name} continues from published head v{version}")
            elif newest < have:
                # the registry has not seen the checkpoint's head: publish it, so a rollback can return to it
                self.registry.publish(name, have, head_to_bytes(self.model, name), {"source": "checkpoint"})
        self.state = "idle"
        self._save_state()

    # ---- outcomes and rollouts --------------------------------------------------------------------
    def record_outcomes(self, outcomes: list[dict]) -> int:
        """Episode outcomes from robots: {"embodiment", "head_version", "success", ...}; returns how many
        counted (episodes of one version, of a head this learner adapts)."""
        with self._outcomes_lock:
            return self._record_outcomes(outcomes)

    def _record_outcomes(self, outcomes: list[dict]) -> int:
        counted = 0
        keep = max(self.config.reference_episodes, self.config.watch_episodes) * 4
        if not isinstance(outcomes, list):
            self.outcome_counts["malformed"] += 1
            return 0
        for o in outcomes:
            self.outcome_counts["received"] += 1
            if not isinstance(o, dict) or not isinstance(o.get("success"), bool):
                self.outcome_counts["malformed"] += 1
                continue
            name, version = o.get("embodiment"), o.get("head_version")
            if version is None:
                self.outcome_counts["mixed"] += 1
                continue
            if isinstance(version, bool) or not isinstance(version, int) or not isinstance(name, str):
                self.outcome_counts["malformed"] += 1
                continue
            if name not in self.names:
                self.outcome_counts["other"] += 1
                continue
            per = self.outcomes.setdefault(name, {})
            help_ = o.get("interventions")
            help_ = int(help_) if isinstance(help_, int) and not isinstance(help_, bool) and help_ >= 0 else None
            per.setdefault(version, deque(maxlen=keep)).append((bool(o["success"]), help_))
            counted += 1
        self.outcome_counts["counted"] += counted
        return counted

    def _judge_rollout(self, name: str) -> dict | None:
        """Decide the watched rollout of `name` if enough episodes ran: confirm or roll back."""
        w = self.watch.get(name)
        if w is None:
            return None
        cfg = self.config
        with self._outcomes_lock:
            per = self.outcomes.get(name, {})
            new = list(per.get(w["version"], ()))
            ref = list(per.get(w["previous"], ()))[-cfg.reference_episodes :]
        timed_out = time.time() - w["published_at"] > cfg.watch_timeout_s
        if len(new) < cfg.watch_episodes:
            if timed_out:
                del self.watch[name]
                return self._event("rollout_confirmed", name, version=w["version"], episodes=len(new), why="timeout")
            return None
        new = new[: cfg.watch_episodes]
        if len(ref) < cfg.min_reference:
            del self.watch[name]
            return self._event(
                "rollout_confirmed", name, version=w["version"], episodes=len(new), why="no reference episodes"
            )
        del self.watch[name]
        rollback, info, reason = judge_rollout(ref, new, cfg, name)
        if rollback:
            return self._rollback(name, w, info, reason)
        return self._event("rollout_confirmed", name, version=w["version"], **info, why=reason)

    def _rollback(self, name: str, w: dict, info: dict, message: str) -> dict:
        from fleet.policy.checkpoint import head_from_bytes

        _, payload = self.registry.get(name, w["previous"])
        meta = {"rollback_of": w["version"], "restores": w["previous"], "reason": message}
        version = self.registry.publish(name, None, payload, meta)
        head_from_bytes(self.model, name, payload)
        self.model.head_versions[name] = int(version)
        self.rollbacks += 1
        event = self._event(
            "rollback",
            name,
            version=int(version),
            rolled_back=w["version"],
            restores=w["previous"],
            reason=message,
            **info,
        )
        self.log(f"learner: {name} v{w['version']} rolled back as v{version}: {message}")
        self._save_state()
        return event

    # ---- rounds -----------------------------------------------------------------------------------
    def pending(self) -> dict[str, int]:
        """New corrections per embodiment since the learner's cursor."""
        counts = self.replay.counts()
        return {n: max(0, int(counts.get(n, {}).get("total_added", 0)) - self.cursors[n]) for n in self.names}

    def step(self) -> list[dict]:
        """One pass: judge watched rollouts, then run a round for each embodiment with enough corrections."""
        if self.state == "created":
            self.start()
        events = []
        for name in self.names:
            event = self._judge_rollout(name)
            if event is not None:
                events.append(event)
        pending = self.pending()
        for name in self.names:
            if name in self.watch or pending[name] < self.config.every:
                continue
            events.append(self.run_round(name))
        return events

    def run_round(self, name: str) -> dict:
        """Adapt `name` on its new corrections; publish the candidate when the validation accepts it."""
        from fleet.policy.checkpoint import head_to_bytes

        got = self.replay.since(name, self.cursors[name])
        corrections = list(got["corrections"])[-self.config.max_round :]
        cursor = int(got["cursor"])
        if not corrections:
            self.cursors[name] = cursor
            return self._event("round_skipped", name, why="no corrections held")
        adapter = self.adapters[name]
        # "adapting" lasts until the round's outcome is published or refused, so a status that reads
        # "idle" never shows a version the registry does not hold yet
        self.state = "adapting"
        self.current = {"embodiment": name, "started": time.time(), "corrections": len(corrections)}
        try:
            result = adapter.round(corrections)
            self.rounds += 1
            info = {
                "corrections": len(corrections),
                "seconds": result.seconds,
                "accepted": result.accepted,
                "reason": result.reason,
                "metrics": result.metrics,
                "from_version": adapter.version,
            }
            if not result.accepted:
                self.cursors[name] = cursor
                event = self._event("round_rejected", name, **info)
                self.log(f"learner: {name} round {self.rounds} not published: {result.reason}")
                self._save_state()
                return event
            previous = adapter.version
            version = max(previous, int(self.registry.latest().get(name, 0))) + 1
            old_state = self.model.head_state_dict(name)
            adapter.accept(result, version)  # the candidate becomes the head the next round starts from
            payload = head_to_bytes(self.model, name)
            meta = {
                "from_version": previous,
                "corrections": len(corrections),
                "seconds": round(result.seconds, 3),
                "gate": result.metrics.get("gate"),
                "holdout_before": result.metrics["before"]["holdout"],
                "holdout_after": result.metrics["after"]["holdout"],
            }
            try:
                plain = json.loads(json.dumps(meta, default=float))
                published = int(self.registry.publish(name, version, payload, plain))
            except Exception:
                adapter.set_head(old_state, previous)  # nothing was published: keep serving v
                raise
            self.model.head_versions[name] = published
            self.cursors[name] = cursor
            self.published += 1
            self.watch[name] = {"version": published, "previous": previous, "published_at": time.time()}
            event = self._event("published", name, version=published, **info)
            self.log(f"learner: {name} v{published} published ({len(corrections)} corrections, {result.seconds:.1f} s)")
            self._save_state()
            return event
        finally:
            self.state, self.current = "idle", None

    # ---- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        """JSON-able summary: state, versions, pending corrections, rollouts watched, last events."""
        last_round = next((e for e in reversed(self.history) if e["event"] in ("published", "round_rejected")), None)
        watch = {}
        for name, w in list(self.watch.items()):
            with self._outcomes_lock:
                ran = len(self.outcomes.get(name, {}).get(w["version"], ()))
            watch[name] = w | {"episodes": ran, "needed": self.config.watch_episodes}
        return {
            "state": self.state,
            "current": self.current,
            "versions": {n: int(self.model.head_versions[n]) for n in self.names},
            "cursors": dict(self.cursors),
            "every": self.config.every,
            "rounds": self.rounds,
            "published": self.published,
            "rollbacks": self.rollbacks,
            "watch": watch,
            "outcomes": dict(self.outcome_counts),
            "last_round": None
            if last_round is None
            else {k: last_round.get(k) for k in ("event", "embodiment", "version", "seconds", "reason", "corrections")},
            "last_error": self.last_error,
        }
