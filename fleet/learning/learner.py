"""The learner's logic (no Ray): adapt a head every N corrections, publish it if it is no worse, watch the
rollout, roll back when the fleet's success drops. `actors/learner.py` runs it as a Ray actor.

    learner = Learner(model, replay, registry, LearnerConfig(every=50), rehearsal={"franka": demo_set})
    learner.start()          # sync with the registry: continue from the newest published head
    learner.step()           # judge rollouts; adapt every embodiment with >= every new corrections
    learner.record_outcomes([EpisodeOutcome(...).to_dict(), ...])   # what robots report (fleet.protocol)

`replay` is anything with ReplayStore's `since(embodiment, cursor)` and `counts()` (the store itself, or a
proxy of the ReplayActor); `registry` anything with HeadStore's `latest()`, `get(name, version)`,
`publish(name, version, payload, meta)` and `history(name)`.

Publishing: a round trains a candidate in memory (fleet.learning.head_adapter); only an accepted candidate is
published, as one `publish` call of a complete safetensors payload, which the registry writes to a
temporary file, fsyncs and renames before it answers. A learner that dies mid-round has published
nothing; the registry refuses any version not above its latest, so versions only increase, and a
restarted learner continues from the registry's newest head and its own saved cursors.

How the success signal reaches the learner: every robot reports each finished episode (`EpisodeOutcome`:
embodiment, head_version, success, interventions, ...), where head_version is the version of every chunk
the episode ran (episodes that ran chunks of two versions carry None and are not counted). The rollout watch
(fleet.learning.rollout.RolloutWatch) judges each published head on them and rolls it back when the fleet
did worse; while a rollout is watched, that embodiment gets no new round.

Where the parts live: the outcomes in fleet.learning.outcomes, the cursors, history and counters that
survive a restart in fleet.learning.learner_state, each head and its version in fleet.learning.trained_head
(the one writer of the version; this module reads it there).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields

from fleet.learning.learner_state import STATE_FILE, LearnerState
from fleet.learning.outcomes import OutcomeLog
from fleet.learning.rollout import RolloutWatch
from fleet.learning.round_config import AdaptConfig
from fleet.learning.trained_head import TrainedHead
from fleet.validate import check_int, check_number, fail

log = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "Learner", "LearnerConfig"]


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
    # fleet.learning.round_config.AdaptConfig keys, e.g. {"steps": 100}
    vision: bool = True
    # corrections one robot made on frames the encoder never saw fit that robot's image adapter instead of
    # training the head (fleet.learning.vision_round); needs the checkpoint's image statistics

    def __post_init__(self) -> None:
        f = "LearnerConfig."
        for name in ("every", "max_round", "rehearsal_episodes", "watch_episodes", "reference_episodes", "threads"):
            lo = 0 if name == "rehearsal_episodes" else 1
            check_int(f + name, getattr(self, name), lo=lo, expected="a positive int" if lo else "an int >= 0")
        if self.max_round < self.every:
            fail(f + "max_round", f"an int >= every ({self.every})", self.max_round)
        check_int(f + "min_reference", self.min_reference, lo=1, expected="a positive int")
        for name in ("poll_interval_s", "watch_timeout_s"):
            _positive(f + name, getattr(self, name), "a positive number of seconds")
        _share(f + "success_drop", self.success_drop, "a share in (0, 1)")
        _share(f + "significance", self.significance, "a level in (0, 1)")
        _positive(f + "intervention_rise", self.intervention_rise, "a positive relative rise, e.g. 0.5")
        if self.embodiments is not None:
            if isinstance(self.embodiments, str) or not all(isinstance(e, str) for e in self.embodiments):
                fail(f + "embodiments", "None or a list of embodiment names", self.embodiments)
            object.__setattr__(self, "embodiments", tuple(self.embodiments))
        if not isinstance(self.vision, bool):
            fail(f + "vision", "true or false", self.vision)
        if not isinstance(self.adapt, dict):
            fail(f + "adapt", "a mapping of AdaptConfig keys", self.adapt)
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


def _positive(field_: str, value, expected: str) -> None:
    """A number > 0 (infinity allowed: "never")."""
    if check_number(field_, value, finite=False, expected=expected) <= 0:
        fail(field_, expected, value)


def _share(field_: str, value, expected: str) -> None:
    """A number strictly between 0 and 1."""
    if not 0 < check_number(field_, value, expected=expected) < 1:
        fail(field_, expected, value)


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
        image_stats: dict | None = None,
    ) -> None:
        """image_stats: {body: ImageStats} of the clean rig (fleet.learning.vision_round.image_stats_of(meta));
        with them (and config.vision) a robot's corrections on novel frames fit its image adapter."""
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
        self.log = log_fn or log.info
        self.heads = {n: TrainedHead(model, n) for n in self.names}  # each head and its version: the one writer
        self.adapters: dict = {}
        self.eyes = None  # fleet.learning.vision_round.RobotAdapters, built at start when there are image stats
        self.image_stats = dict(image_stats or {}) if cfg.vision else {}
        self.saved = LearnerState(self.names, state_dir)  # cursors, history, counters: survive a restart
        self.outcomes = OutcomeLog(self.names, keep=max(cfg.reference_episodes, cfg.watch_episodes) * 4)
        self.rollouts = RolloutWatch(cfg, self.outcomes, registry, self.heads, self.saved, self.log)
        self.state = "created"
        self.current: dict | None = None  # the round in progress: {"embodiment", "started", "corrections"}
        self.last_error: str | None = self.saved.load()

    # the parts' state under the names callers (status, tests, the actor) use
    @property
    def state_dir(self):
        return self.saved.state_dir

    @property
    def cursors(self) -> dict[str, int]:
        return self.saved.cursors

    @property
    def history(self) -> list[dict]:
        return self.saved.history

    @property
    def watch(self) -> dict[str, dict]:
        return self.rollouts.watching

    @property
    def outcome_counts(self) -> dict[str, int]:
        return self.outcomes.counts

    # ---- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Build the adapters (rehearsal memory encoded once) on the checkpoint's heads, reload the corrections
        earlier rounds learnt from, then continue from the registry's newest head of each embodiment."""
        from fleet.learning.head_adapter import HeadAdapter  # torch: off this module's path (launcher, actor handle)
        from fleet.learning.round_data import rehearsal_set  # torch, likewise

        self.state = "preparing"
        latest = self.registry.latest()
        for name in self.names:
            rehearsal = self.rehearsal.get(name)
            if rehearsal is None and self.config.rehearsal_episodes > 0:
                rehearsal = rehearsal_set(name, self.config.rehearsal_episodes)
            # built on the checkpoint's head: the one the rehearsal labels (and a hardware change) refer to
            adapter = HeadAdapter(self.model, name, rehearsal, self.adapt_config, head=self.heads[name])
            self._reload_earlier(adapter)
            self.adapters[name] = adapter
            self._sync_with_registry(name, int(latest.get(name, 0)))
        if self.image_stats:
            from fleet.learning.vision_round import RobotAdapters  # torch, like the adapters

            self.eyes = RobotAdapters(self.model, self.image_stats, self.registry, self.log)
            self.eyes.load()
        self.state = "idle"
        self.saved.save()

    def _reload_earlier(self, adapter) -> None:
        """After a restart: the corrections the earlier incarnation learnt from, back into the adapter's pools."""
        cursor = self.cursors[adapter.name]
        if cursor <= 0:
            return
        got = self.replay.since(adapter.name, max(0, cursor - self.adapt_config.max_corrections))
        items = list(got["corrections"])
        first = int(got["cursor"]) - len(items)  # sequence number of items[0]
        adapter.add_earlier(items[: max(0, cursor - first)])

    def _sync_with_registry(self, name: str, newest: int) -> None:
        """Continue from the registry's newest head, or publish the checkpoint's head if the registry lacks it."""
        head = self.heads[name]
        if newest > head.version:
            version, payload = self.registry.get(name, newest)
            head.install_payload(payload, int(version))
            self.log(f"learner: {name} continues from published head v{version}")
        elif newest < head.version:
            # the registry has not seen the checkpoint's head: publish it, so a rollback can return to it
            self.registry.publish(name, head.version, head.payload(), {"source": "checkpoint"})

    # ---- outcomes ---------------------------------------------------------------------------------
    def record_outcomes(self, outcomes: list[dict]) -> int:
        """Episode outcomes from robots (`fleet.protocol.EpisodeOutcome` dicts); returns how many counted
        (episodes of one version, of a head this learner adapts). Malformed ones are counted and dropped."""
        return self.outcomes.record(outcomes)

    # ---- rounds -----------------------------------------------------------------------------------
    def pending(self) -> dict[str, int]:
        """New corrections per embodiment since the learner's cursor."""
        counts = self.replay.counts()
        return {n: max(0, int(counts.get(n, {}).get("total_added", 0)) - self.cursors[n]) for n in self.names}

    def step(self) -> list[dict]:
        """One pass: judge watched rollouts, then run a round for each embodiment with enough corrections."""
        if self.state == "created":
            self.start()
        events = [e for e in (self.rollouts.judge(name) for name in self.names) if e is not None]
        pending = self.pending()
        for name in self.names:
            if name in self.rollouts or pending[name] < self.config.every:
                continue
            events.append(self.run_round(name))
        return events

    def step_failed(self, exc: BaseException) -> None:
        """A step raised: note why, and be ready for the next (start again if the adapters are not all built)."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.state = "idle" if len(self.adapters) == len(self.names) else "created"

    def run_round(self, name: str) -> dict:
        """Adapt `name` on its new corrections; publish the candidate when the validation accepts it."""
        got = self.replay.since(name, self.cursors[name])
        corrections = list(got["corrections"])[-self.config.max_round :]
        cursor = int(got["cursor"])
        if not corrections:
            self.cursors[name] = cursor
            return self.saved.event("round_skipped", name, why="no corrections held")
        if self.eyes is not None:
            corrections, images = self.eyes.split(name, corrections)
            for published in images:
                self.saved.event("image_adapter", name, **published)
            if not corrections:  # all the camera's work this time: nothing for the head
                self.cursors[name] = cursor
                self.saved.save()
                return self.saved.event("round_skipped", name, why="corrections were the camera's (image adapters)")
        adapter = self.adapters[name]
        # "adapting" lasts until the round's outcome is published or refused, so a status that reads
        # "idle" never shows a version the registry does not hold yet
        self.state = "adapting"
        self.current = {"embodiment": name, "started": time.time(), "corrections": len(corrections)}
        try:
            result = adapter.round(corrections)
            info = {
                "corrections": len(corrections),
                "seconds": result.seconds,
                "accepted": result.accepted,
                "reason": result.reason,
                "metrics": result.metrics,
                "from_version": self.heads[name].version,
            }
            if not result.accepted:
                with self.saved.change():
                    self.saved.rounds += 1
                    self.cursors[name] = cursor
                    event = self.saved.event("round_rejected", name, **info)
                self.log(f"learner: {name} round {self.saved.rounds} not published: {result.reason}")
                return event
            previous = self.heads[name].version
            version = self._publish(name, adapter, result, len(corrections))
            with self.saved.change():  # a status never shows a publish that a kill could still lose
                self.saved.rounds += 1
                self.saved.published += 1
                self.rollouts.start(name, version, previous)
                self.cursors[name] = cursor
                event = self.saved.event("published", name, version=version, **info)
            self.log(f"learner: {name} v{version} published ({len(corrections)} corrections, {result.seconds:.1f} s)")
            return event
        finally:
            self.state, self.current = "idle", None

    def _publish(self, name: str, adapter, result, corrections: int) -> int:
        """Install the accepted candidate as the next version and publish it (one `publish` call); if that
        fails the previous head is put back, so the learner keeps what the fleet serves. Returns the version."""
        head = self.heads[name]
        previous = head.version
        version = max(previous, int(self.registry.latest().get(name, 0))) + 1
        old_state = head.state()
        adapter.accept(result, version)  # the candidate becomes the head the next round starts from
        meta = {
            "from_version": previous,
            "corrections": corrections,
            "seconds": round(result.seconds, 3),
            "gate": result.metrics.get("gate"),
            "holdout_before": result.metrics["before"]["holdout"],
            "holdout_after": result.metrics["after"]["holdout"],
        }
        try:
            plain = json.loads(json.dumps(meta, default=float))
            # the registry stores `version` (above its latest) or raises: the number stays the one installed
            self.registry.publish(name, version, head.payload(), plain)
        except Exception:
            head.install(old_state, previous)  # nothing was published: keep serving `previous`
            raise
        return version

    # ---- status -----------------------------------------------------------------------------------
    def status(self) -> dict:
        """JSON-able summary: state, versions, pending corrections, rollouts watched, last events."""
        with self.saved.lock:  # between changes: what it shows is saved
            return self._status()

    def _status(self) -> dict:
        last_round = next((e for e in reversed(self.history) if e["event"] in ("published", "round_rejected")), None)
        return {
            "state": self.state,
            "current": self.current,
            "versions": {n: self.heads[n].version for n in self.names},
            "cursors": dict(self.cursors),
            "every": self.config.every,
            "rounds": self.saved.rounds,
            "published": self.saved.published,
            "rollbacks": self.saved.rollbacks,
            "watch": self.rollouts.status(),
            "outcomes": dict(self.outcome_counts),
            "last_round": None
            if last_round is None
            else {k: last_round.get(k) for k in ("event", "embodiment", "version", "seconds", "reason", "corrections")},
            "last_error": self.last_error or self.rollouts.last_error,
            "image_adapters": {} if self.eyes is None else self.eyes.status(),
        }
