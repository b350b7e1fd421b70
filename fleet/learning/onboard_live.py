"""A new body's onboarding in a running fleet, without Ray: demonstrations in, a published head out.

    session = OnboardSession(plan, model, publish=lambda payload, meta: registry.publish(...))
    session.add_episode(samples)          # one demonstration episode: every tick's (obs, operator chunk)
    if session.due(): session.train_round()   # after M, then every N demonstrations: train, check, publish

Phases: "demonstrations" (the operator drives every action; nothing is served for the body yet) until a
candidate clears the held-out check, then "policy" (its robots run the published head, the operator corrects,
and corrections keep feeding later rounds). The backbone and the other heads are never touched: training
changes only the new body's token row, stem and head (fleet.learning.onboard).

The rollback watch applies from v2 on, as for the pretrained bodies' learner (fleet.learning.rollout): after
v(k) -> v(k+1), the first `watch_episodes` policy episodes of v(k+1) are judged against the newest
`reference_episodes` of v(k) (success, and the operator's interventions per episode); a significant drop
re-publishes v(k)'s payload as v(k+2) and training continues from v(k)'s parameters. While a rollout is
watched, no round runs, so every verdict compares exactly two versions.

The episodes come from the fleet's replay store: the new body's robots are ordinary robot actors, started in
demonstration mode (fleet.robot.demonstration; every chunk a correction with no policy action) and switched to
the policy once v1 is served; `episodes_from_corrections` turns their records into training episodes.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from fleet.learning.onboard import OnboardData, train_new_body
from fleet.learning.onboard_spec import OnboardSpec
from fleet.policy.demos import DemoSet

PHASES = ("demonstrations", "policy")
CHECK_SEED = 7_000_003  # held-out check scenes: disjoint from demonstrations (robots' seeds) and evaluation


class OnboardSession:
    """Demonstrations of one new body, its training rounds and its phase. Thread-safe."""

    def __init__(
        self,
        plan: OnboardSpec,
        model,
        publish: Callable[[bytes, dict], int],
        log: Callable[[str], None] = lambda m: None,
    ) -> None:
        """model: a FleetPolicy that has the body added (FleetPolicy.add_embodiment) at version 0; the session
        trains it. publish(payload, meta) -> version: where a head that passed the check goes (the registry)."""
        self.plan = plan
        self.name = plan.spec.name
        if self.name not in model.specs or not model.is_added(self.name):
            raise ValueError(f"OnboardSession: the model must have {self.name!r} added (add_embodiment)")
        self.model = model
        self.publish = publish
        self.log = log
        self.phase = "demonstrations"
        self.version = 0
        self.episodes: deque[DemoSet] = deque(maxlen=plan.max_demos)
        self.new_since_round = 0
        self.rounds: list[dict] = []
        self.total_demos = 0
        # the rollback watch: per version its newest policy episodes (success, interventions); the payloads of
        # the live version and the one before it; the rollout under watch; what it decided
        keep = max(plan.watch_episodes, plan.reference_episodes)
        self.outcomes: dict[int, deque[tuple[bool, int]]] = defaultdict(lambda: deque(maxlen=keep))
        self._payloads: dict[int, bytes] = {}
        self.watch: dict | None = None
        self.rollouts: deque[dict] = deque(maxlen=100)
        # the round in progress: {"round", "stage": "training" | "checking", "steps", "done", "started"}, else None
        self.training: dict | None = None
        self._lock = threading.Lock()
        self._train_lock = threading.Lock()
        # when the first round started and v1 was published (time.time()): the onboarding's timeline
        self.marks: dict[str, float] = {}
        # episodes that arrived while a round trains, (episode, new), taken in by the round as it goes; else None
        self._arrived: list[tuple[DemoSet, bool]] | None = None

    def add_episode(self, episode: DemoSet, new: bool = True) -> None:
        """One demonstration (or corrected) episode of this body; the oldest beyond max_demos are dropped.
        new=False: more samples of an episode already counted (its records arrived in two reads)."""
        if episode.embodiment != self.name:
            raise ValueError(f"add_episode: an episode of {episode.embodiment!r}, not {self.name!r}")
        if len(episode) == 0:
            return
        with self._lock:
            self.episodes.append(episode)
            self.new_since_round += int(new)
            self.total_demos += int(new)
            if self._arrived is not None:  # a round is training: it takes this one in at its next refresh
                self._arrived.append((episode, bool(new)))

    def due(self) -> bool:
        """Whether a round is due: `first_round_demos` demonstrations before the first, then N new ones since
        the last round (never while a rollout is watched)."""
        with self._lock:
            need = self.plan.demos_per_round if self.rounds else self.plan.first_round_demos
            return self.new_since_round >= need and self.watch is None

    def train_round(self, seed: int | None = None) -> dict:
        """Train the new parts on every kept demonstration, run the held-out check, publish if it passes. The
        first round runs `first_round_steps` steps, later ones `steps_per_round`. Episodes that arrive while
        it trains join its data as they come (every `more_every` steps), so the first round can start on its
        first `first_round_demos` and end having seen the ones recorded meanwhile."""
        with self._train_lock:
            with self._lock:
                episodes = list(self.episodes)
                self.new_since_round = 0
                self._arrived = []
            seed = len(self.rounds) if seed is None else seed
            steps = self.plan.steps_per_round if self.rounds else self.plan.first_round_steps
            with self._lock:
                self.training = {"round": len(self.rounds) + 1, "stage": "training", "steps": steps, "done": 0}
                self.training |= {"started": time.time(), "demos": len(episodes)}
                self.marks.setdefault("first_round", self.training["started"])
            grown = {"data": None, "episodes": len(episodes), "kept": len(episodes)}

            def more() -> OnboardData | None:
                with self._lock:
                    # at most max_demos episodes in a round, as in the session's own memory: a fleet run flat out
                    # records faster than a round trains, and the rest wait for the next round
                    arrived = (self._arrived or [])[: max(0, self.plan.max_demos - grown["kept"])]
                    grown["kept"] += len(arrived)
                    self._arrived = [] if grown["kept"] < self.plan.max_demos else None
                    self.new_since_round -= sum(new for _, new in arrived)  # this round learns from them
                if not arrived:
                    return None
                grown["episodes"] += sum(new for _, new in arrived)
                grown["data"] = grown["data"].extend(OnboardData.from_demos(self.model, _joined(arrived)))
                with self._lock:
                    if self.training is not None:
                        self.training["demos"] = grown["episodes"]
                return grown["data"]

            try:
                grown["data"] = OnboardData.from_demos(self.model, _joined([(e, True) for e in episodes]))
                opts = {"steps": steps, "batch_size": 32, "lr": 3e-3, "seed": seed, "progress": self._trained}
                report = train_new_body(self.model, self.name, grown["data"], more=more, **opts)
                with self._lock:
                    self.training |= {"stage": "checking", "done": report.steps}
                success = self.check()
            finally:
                with self._lock:
                    self.training = None
                    self._arrived = None
            data = grown["data"]
            passed = success >= self.plan.check_success
            entry = {
                "round": len(self.rounds) + 1,
                "demos": grown["episodes"],
                "samples": len(data),
                "steps": report.steps,
                "train_s": report.seconds,
                "loss": report.losses[-1] if report.losses else None,
                "check_success": success,
                "published": None,
            }
            if passed:
                from fleet.policy.checkpoint import head_to_bytes  # torch: only where a model is trained

                version = self.version + 1
                payload = head_to_bytes(self.model, self.name, version)
                meta = {"onboard_round": entry["round"], "check_success": success, "demos": entry["demos"]}
                previous, self.version = self.version, int(self.publish(payload, meta))
                self.model.head_versions[self.name] = self.version
                self._payloads = {v: b for v, b in self._payloads.items() if v == previous} | {self.version: payload}
                if previous >= 1:
                    self.watch = {"version": self.version, "previous": previous, "published_at": time.time()}
                entry["published"] = self.version
                self.marks.setdefault("v1", time.time())
                self.phase = "policy"
            self.rounds.append(entry)
            self.log(
                f"onboard {self.name} round {entry['round']}: {entry['demos']} demos, {report.steps} steps in "
                f"{report.seconds:.0f} s, held-out check {success:.0%} -> "
                + (f"published v{entry['published']}" if passed else "not published")
            )
            return entry

    def _trained(self, steps: int, loss: float) -> None:
        """train_new_body's progress callback: `fleet embodiment status` shows how far the round is."""
        with self._lock:
            if self.training is not None:
                self.training["done"] = int(steps)

    def record_policy_episode(self, version: int, ok: bool, interventions: int) -> dict | None:
        """One policy episode that ran on head `version` (success; operator overrides in it). Judges the watched
        rollout once it has `watch_episodes` episodes: the verdict (rollout_confirmed or rollback), else None."""
        from fleet.learning.rollout import judge_rollout

        plan = self.plan
        with self._lock:
            self.outcomes[int(version)].append((bool(ok), int(interventions)))
            w = self.watch
            if w is None or int(version) != w["version"] or len(self.outcomes[version]) < plan.watch_episodes:
                return None
            new = list(self.outcomes[version])[: plan.watch_episodes]
            ref = list(self.outcomes.get(w["previous"], ()))[-plan.reference_episodes :]
        if not ref:
            return self._decided(w, "rollout_confirmed", {"episodes": len(new)}, "no reference episodes")
        from fleet.learning.learner import LearnerConfig  # the learner's test level and intervention rise

        cfg = replace(LearnerConfig(), success_drop=plan.success_drop)
        back, info, reason = judge_rollout(ref, new, cfg, self.name)
        if not back:
            return self._decided(w, "rollout_confirmed", info, reason)
        with self._train_lock:  # never while a round trains the parameters this restores
            payload = self._payloads[w["previous"]]
            meta = {"rollback_of": w["version"], "restores": w["previous"], "reason": reason}
            number = int(self.publish(payload, meta))
            from fleet.policy.checkpoint import head_from_bytes  # torch: only where a model is trained

            head_from_bytes(self.model, self.name, payload)
            self.model.head_versions[self.name] = number
            with self._lock:
                self.version = number
                self._payloads = {w["previous"]: payload, number: payload}
                # the same head: its episodes carry over as the reference of the next rollout
                self.outcomes[number].extend(self.outcomes[w["previous"]])
        self.log(f"onboard {self.name}: v{w['version']} rolled back as v{number} (restores v{w['previous']}): {reason}")
        return self._decided(w, "rollback", info | {"version": number, "restores": w["previous"]}, reason)

    def _decided(self, w: dict, kind: str, info: dict, why: str) -> dict:
        event = {"event": kind, "rolled_out": w["version"], "previous": w["previous"], "why": why} | info
        event["at"] = time.time()
        with self._lock:
            self.watch = None
            self.rollouts.append(event)
        return event

    def check(self) -> float:
        """Held-out closed-loop success of the current parameters (scenes no demonstration used)."""
        from fleet.policy.evaluate import evaluate
        from fleet.policy.train import chunk_policy

        result = evaluate(chunk_policy(self.model), self.name, self.plan.check_episodes, seed=CHECK_SEED)
        return result.success_rate

    def status(self) -> dict:
        with self._lock:
            return {
                "embodiment": self.name,
                "phase": self.phase,
                "head_version": self.version,
                "demos": self.total_demos,
                "demos_kept": len(self.episodes),
                "rounds": [dict(r) for r in self.rounds],
                "training": None
                if self.training is None
                else self.training | {"elapsed_s": round(time.time() - self.training["started"], 1)},
                "watch": None
                if self.watch is None
                else self.watch | {"episodes": len(self.outcomes[self.watch["version"]])},
                "rollouts": [dict(e) for e in self.rollouts],
                "marks": dict(self.marks),
            }


def _joined(episodes: list[tuple[DemoSet, bool]]) -> DemoSet:
    """The samples of (episode, new) pairs as one DemoSet."""
    demos = episodes[0][0]
    for e, _ in episodes[1:]:
        demos = demos.extend(e)
    return demos


def episodes_from_corrections(name: str, corrections: list) -> list[tuple[tuple[str, int], DemoSet]]:
    """The replay store's records of body `name` (demonstrations, `policy_chunk=None`, and the operator's
    corrections of policy chunks alike) as training episodes: one DemoSet per (robot, episode), in the order
    their first records came, keyed by (robot_id, episode). Each sample is (image, proprio, instruction, the
    chunk the operator commanded)."""
    groups: dict[tuple[str, int], list] = {}
    for c in corrections:
        if c.embodiment == name:
            groups.setdefault((c.robot_id, int(c.episode)), []).append(c)
    out = []
    for key, cs in groups.items():
        out.append(
            (
                key,
                DemoSet(
                    name,
                    np.stack([np.asarray(c.image, np.uint8) for c in cs]),
                    np.stack([np.asarray(c.proprio, np.float32) for c in cs]),
                    [c.instruction for c in cs],
                    np.stack([np.asarray(c.corrected_chunk, np.float32) for c in cs]),
                    0,
                    1,
                ),
            )
        )
    return out
