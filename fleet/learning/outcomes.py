"""The fleet's episode outcomes as the learner keeps them: per embodiment and head version, the newest
(success, interventions) pairs, from which a rollout is judged (fleet.learning.rollout).

Every robot reports each finished episode as a `fleet.protocol.EpisodeOutcome` dict; a record that does not
validate is counted as malformed and dropped, and so is nothing else that was sent alongside it.
"""

from __future__ import annotations

import threading
from collections import deque

from fleet.protocol import EpisodeOutcome


class OutcomeLog:
    """Outcomes of the heads in `names`, the newest `keep` per version. Thread-safe: robots report from other
    threads while a round runs.

    `counts`: "received" (records), "malformed" (not an EpisodeOutcome, or not a list of them), "mixed" (the
    episode ran two head versions, or none: it says nothing about one), "other" (a head this learner does not
    adapt) and "counted"."""

    def __init__(self, names: tuple[str, ...], keep: int) -> None:
        self.names, self.keep = names, keep
        self.counts = {"received": 0, "counted": 0, "mixed": 0, "other": 0, "malformed": 0}
        self._by_version: dict[str, dict[int, deque]] = {}  # embodiment -> version -> recent outcomes
        self._lock = threading.Lock()

    def record(self, outcomes: list[dict]) -> int:
        """Keep `outcomes` (EpisodeOutcome dicts); returns how many counted."""
        with self._lock:
            if not isinstance(outcomes, list):
                self.counts["malformed"] += 1
                return 0
            counted = sum(self._record_one(o) for o in outcomes)
            self.counts["counted"] += counted
            return counted

    def _record_one(self, record) -> bool:
        self.counts["received"] += 1
        try:
            outcome = EpisodeOutcome.from_dict(record)
        except ValueError:
            self.counts["malformed"] += 1
            return False
        if outcome.head_version is None:
            self.counts["mixed"] += 1
            return False
        if outcome.embodiment not in self.names:
            self.counts["other"] += 1
            return False
        # interventions only where the robot reported them (a record without them says nothing about help)
        help_ = outcome.interventions if "interventions" in record else None
        per = self._by_version.setdefault(outcome.embodiment, {})
        per.setdefault(outcome.head_version, deque(maxlen=self.keep)).append((outcome.success, help_))
        return True

    def episodes(self, name: str, version: int) -> list[tuple[bool, int | None]]:
        """(success, interventions or None) of the episodes kept for head `name` at `version`, oldest first."""
        with self._lock:
            return list(self._by_version.get(name, {}).get(version, ()))

    def count(self, name: str, version: int) -> int:
        with self._lock:
            return len(self._by_version.get(name, {}).get(version, ()))
