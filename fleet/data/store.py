"""The replay store: the logic behind `actors.replay.ReplayActor`, testable without Ray.

An `add` validates each correction, drops ids already stored, appends the new ones to the durable log
and only then puts them in memory and answers; that answer is the acknowledgement. A new store
reloads the log, so a restarted actor holds exactly what was acknowledged before. The reload streams the
log into the bounded buffers (memory does not grow with the log), validates every row again, and sets
aside a part it cannot read (`CorrectionLog.iter_all`: quarantined, counted, shown in `stats`) instead of
failing: a store that cannot start would be restarted by Ray forever while robots drop corrections.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fleet.data.buffer import CorrectionBuffer, SampleMode
from fleet.data.correction import Correction, CorrectionError, validate_correction
from fleet.data.export import export_corrections
from fleet.data.log import ADDED_FILE, CorrectionLog, CorrectionLogError, read_added_specs
from fleet.durable import write_text_atomic
from fleet.embodiments import BUILTIN_EMBODIMENTS, EMBODIMENTS, EmbodimentSpec

log = logging.getLogger(__name__)

UNKNOWN_EMBODIMENT = "_unknown"
# stats key for rejected corrections whose embodiment is not registered (keeps the key set bounded)


class ReplayStore:
    """Durable, deduplicated correction store over one log directory (one store per directory)."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        capacity: int = 1000,
        *,
        compact_every: int | None = 256,
        specs: dict[str, EmbodimentSpec] | None = None,
        publish_delay_s: float = 0.0,
    ):
        self.specs = EMBODIMENTS if specs is None else specs
        self.log = CorrectionLog(log_dir, publish_delay_s=publish_delay_s)
        # bodies added to the running fleet (`fleet embodiment add`), before the reload validates their rows
        self.added_at_start = self._load_added()
        self.compact_every = compact_every
        # merge small log parts after this many appends (None: never); keeps restarts fast
        # A previous incarnation of this store may have died mid-append; its temp file was never
        # acknowledged, and this is the only writer, so it can go.
        self.temp_files_removed_at_start = self.log.remove_temp_files()
        self.buffer = CorrectionBuffer(capacity)
        self.loaded_at_start = 0
        for c in self.log.iter_all(self.specs):
            self.buffer.add(c)
            self.loaded_at_start += 1
        self.quarantined_at_start = list(self.log.quarantined)
        self.invalid_rows_at_start = self.log.invalid_rows
        self._appends_since_compact = len(self.log.parts())
        self._accepted: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self.compaction_errors = 0

    # ---- bodies added at run time --------------------------------------------------------------
    def _added_path(self) -> Path:
        return Path(self.log.directory) / ADDED_FILE

    def _load_added(self) -> list[str]:
        added = read_added_specs(self.log.directory)
        for spec in added.values():
            self._register(spec)
        return sorted(added)

    def _register(self, spec: EmbodimentSpec) -> None:
        if spec.name in BUILTIN_EMBODIMENTS:
            raise ValueError(f"embodiment: {spec.name!r} is built in: expected the name of a new body")
        self.specs[spec.name] = spec

    def register_embodiment(self, spec: dict | EmbodimentSpec) -> list[str]:
        """Accept corrections of a body added to the running fleet (`fleet embodiment add`; EmbodimentSpec or its
        to_dict()). Kept in the log directory (ADDED_FILE), so a restarted store validates and reloads its rows.
        Returns the bodies added so far. ValueError (naming the field) for a malformed spec or a built-in name."""
        spec = spec if isinstance(spec, EmbodimentSpec) else EmbodimentSpec.from_dict(spec)
        self._register(spec)
        try:
            added = json.loads(self._added_path().read_text())
        except (OSError, ValueError):
            added = {}
        added = (added if isinstance(added, dict) else {}) | {spec.name: spec.to_dict()}
        write_text_atomic(self._added_path(), json.dumps(added))
        return sorted(added)

    # ---- writing ------------------------------------------------------------------------------
    def add(self, corrections: list[Correction | dict] | Correction | dict) -> dict[str, list]:
        """Validate, deduplicate, store durably, then acknowledge.

        Returns {"accepted": [ids], "duplicates": [ids], "rejected": [{"id", "error"}]}. Accepted and
        duplicate ids are both durable (a duplicate was stored by an earlier attempt); rejected ones are
        not stored. Raises only if `corrections` is not a list or the log write fails, and then nothing
        is acknowledged.
        """
        if isinstance(corrections, (Correction, dict)):
            corrections = [corrections]
        if not isinstance(corrections, (list, tuple)):
            raise CorrectionError(f"corrections: expected a list of corrections, got {type(corrections).__name__}")
        accepted: list[Correction] = []
        duplicates: list[str] = []
        rejected: list[dict[str, Any]] = []
        batch_ids: set[str] = set()
        for item in corrections:
            try:
                c = validate_correction(item, self.specs)
            except Exception as exc:  # noqa: BLE001 - bad input must never take the store down
                error = str(exc) if isinstance(exc, CorrectionError) else f"correction: {type(exc).__name__}: {exc}"
                rejected.append({"id": _claimed_id(item), "error": error})
                self._rejected[_claimed_embodiment(item, self.specs)] += 1
                continue
            if c.id in self.buffer or c.id in batch_ids:
                duplicates.append(c.id)
                self._duplicates[c.embodiment] += 1
                continue
            batch_ids.add(c.id)
            accepted.append(c)
        if accepted:
            self.log.append(accepted)  # durable before anything else sees them
            for c in accepted:
                self.buffer.add(c)
                self._accepted[c.embodiment] += 1
            self._appends_since_compact += 1
            if self.compact_every is not None and self._appends_since_compact >= self.compact_every:
                try:
                    self.compact()
                except (OSError, CorrectionLogError) as exc:  # the batch is durable: still acknowledge it
                    self.compaction_errors += 1
                    self._appends_since_compact = 0  # try again after another compact_every appends
                    log.warning("replay store %s: compaction failed, will retry later: %s", self.log.directory, exc)
        return {"accepted": [c.id for c in accepted], "duplicates": duplicates, "rejected": rejected}

    def compact(self) -> int:
        """Merge small log parts; returns how many parts were removed."""
        removed = self.log.compact()
        self._appends_since_compact = len(self.log.parts())
        return removed

    # ---- reading ------------------------------------------------------------------------------
    def _check_embodiment(self, embodiment: str) -> None:
        if embodiment not in self.specs and embodiment not in self.buffer.embodiments():
            raise ValueError(f"embodiment: expected one of {sorted(self.specs)}, got {embodiment!r}")

    def sample(
        self,
        embodiment: str,
        n: int,
        mode: SampleMode = "uniform",
        seed: int | None = None,
        half_life: float | None = None,
    ) -> list[Correction]:
        """`n` held corrections of `embodiment`, with replacement ([] if none); see CorrectionBuffer.sample."""
        self._check_embodiment(embodiment)
        return self.buffer.sample(embodiment, n, np.random.default_rng(seed), mode=mode, half_life=half_life)

    def since(self, embodiment: str, cursor: int = 0) -> dict[str, Any]:
        """New corrections after `cursor`: {"corrections", "cursor" (pass it next time), "missed" (evicted)}."""
        self._check_embodiment(embodiment)
        items = self.buffer.since(embodiment, cursor)
        total = self.buffer.total_added(embodiment)
        return {"corrections": items, "cursor": total, "missed": max(0, total - len(items) - int(cursor))}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per embodiment: {"count": held in memory, "total_added": ever stored (monotonic, survives restarts)}."""
        names = sorted(set(self.specs) | set(self.buffer.embodiments()))
        return {n: {"count": self.buffer.count(n), "total_added": self.buffer.total_added(n)} for n in names}

    def stats(self) -> dict[str, Any]:
        """Counters since this store started, plus the log and buffer state."""
        return {
            "log_dir": str(self.log.directory),
            "pid": os.getpid(),
            "accepted": dict(self._accepted),
            "duplicates": dict(self._duplicates),
            "rejected": dict(self._rejected),
            "rejected_total": sum(self._rejected.values()),
            "loaded_at_start": self.loaded_at_start,
            "added_at_start": list(self.added_at_start),
            "quarantined_at_start": self.quarantined_at_start,
            "invalid_rows_at_start": self.invalid_rows_at_start,
            "temp_files_removed_at_start": self.temp_files_removed_at_start,
            "compaction_errors": self.compaction_errors,
            "log": self.log.stats(),
            "buffer": self.buffer.stats(),
        }

    def log_dir(self) -> str:
        return str(Path(self.log.directory).resolve())

    def export(self, out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """Write every stored correction as a LeRobot-style dataset; see fleet.data.export.export_corrections."""
        return export_corrections(list(self.log.iter_all(self.specs)), out_dir, **kwargs)


def _claimed_id(item: Any) -> str | None:
    ident = item.id if isinstance(item, Correction) else item.get("id") if isinstance(item, dict) else None
    return ident if isinstance(ident, str) else None


def _claimed_embodiment(item: Any, specs: dict[str, EmbodimentSpec]) -> str:
    name = (
        item.embodiment if isinstance(item, Correction) else item.get("embodiment") if isinstance(item, dict) else None
    )
    return name if isinstance(name, str) and name in specs else UNKNOWN_EMBODIMENT
