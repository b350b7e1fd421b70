"""What a learner keeps across restarts: how far it read each embodiment's corrections (its cursors), the
event history (rounds, publishes, rollouts, rollbacks), its counters, the rollouts it watches and the
rollbacks it decided but has not done yet, in `state_dir/learner_state.json` (written atomically:
fleet.durable).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleet.durable import write_text_atomic

STATE_FILE = "learner_state.json"
HISTORY = 500
# events kept, the newest


class LearnerState:
    """Cursors, history and counters of a learner adapting the heads in `names`; in memory only without
    `state_dir`."""

    def __init__(self, names: tuple[str, ...], state_dir: str | os.PathLike | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.cursors: dict[str, int] = dict.fromkeys(names, 0)
        self.history: list[dict] = []  # every round, publish and rollback, oldest first
        self.rounds = 0
        self.published = 0
        self.rollbacks = 0
        self.watching: dict[str, dict] = {}  # rollouts under watch (fleet.learning.rollout.RolloutWatch)
        self.pending_rollbacks: dict[str, dict] = {}  # rollbacks decided, retried until done
        # held while a change is made and saved: a reader holding it (the learner's status) never sees a
        # change that a kill could still lose
        self.lock = threading.RLock()

    @property
    def path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / STATE_FILE

    def load(self) -> str | None:
        """Continue from the saved state, if any; returns why it could not be read (then it starts afresh)."""
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            self.cursors.update({k: int(v) for k, v in saved.get("cursors", {}).items() if k in self.cursors})
            self.history = list(saved.get("history", []))[-HISTORY:]
            self.rounds = int(saved.get("rounds", 0))
            self.published = int(saved.get("published", 0))
            self.rollbacks = int(saved.get("rollbacks", 0))
            names = set(self.cursors)
            self.watching = {k: dict(v) for k, v in dict(saved.get("watching", {})).items() if k in names}
            pending = dict(saved.get("pending_rollbacks", {}))
            self.pending_rollbacks = {k: dict(v) for k, v in pending.items() if k in names}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return f"learner state {path}: unreadable, starting afresh ({exc})"
        return None

    @contextmanager
    def change(self) -> Iterator[None]:
        """Make a change and save it, as one step for a reader that holds `lock`."""
        with self.lock:
            yield
            self.save()

    def save(self) -> None:
        path = self.path
        if path is None:
            return
        state = {
            "cursors": self.cursors,
            "history": self.history[-HISTORY:],
            "rounds": self.rounds,
            "published": self.published,
            "rollbacks": self.rollbacks,
            "watching": self.watching,
            "pending_rollbacks": self.pending_rollbacks,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(state, default=str))

    def event(self, kind: str, name: str, **info) -> dict:
        """Append an event of head `name` to the history; returns it."""
        event = {"event": kind, "embodiment": name, "t": time.time()} | info
        self.history.append(event)
        del self.history[:-HISTORY]
        return event
