"""Bounded in-memory replay: one ring buffer of recent corrections per embodiment, deduplicated by id.

The course notes' buffer pops from the front of a list (O(n) per insert); this one overwrites the
oldest slot of a fixed-size ring, so adding, indexing and sampling cost O(1) per item.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fleet.data.correction import Correction

SampleMode = Literal["uniform", "recency"]


class _Ring:
    """Fixed-capacity ring addressed by a monotonic sequence number (0 = first item ever added)."""

    def __init__(self, capacity: int):
        self.slots: list[Correction | None] = [None] * capacity
        self.total = 0
        # items ever added; the newest has sequence number total - 1

    @property
    def oldest(self) -> int:
        """Sequence number of the oldest item still held."""
        return max(0, self.total - len(self.slots))

    def __len__(self) -> int:
        return self.total - self.oldest

    def append(self, item: Correction) -> None:
        self.slots[self.total % len(self.slots)] = item
        self.total += 1

    def get(self, seq: int) -> Correction:
        return self.slots[seq % len(self.slots)]  # type: ignore[return-value]


class CorrectionBuffer:
    """Per-embodiment rings of the `capacity_per_embodiment` newest corrections, plus every id ever seen.

    The id set is not bounded by the capacity on purpose: it also holds ids evicted from the rings (and
    ids loaded from the log), so a late retry of an old correction is still recognised as a duplicate.
    """

    def __init__(self, capacity_per_embodiment: int = 1000):
        if not isinstance(capacity_per_embodiment, int) or capacity_per_embodiment < 1:
            raise ValueError(f"capacity_per_embodiment must be a positive int, got {capacity_per_embodiment!r}")
        self.capacity = capacity_per_embodiment
        self._rings: dict[str, _Ring] = {}
        self._ids: set[str] = set()

    def __contains__(self, correction_id: str) -> bool:
        return correction_id in self._ids

    def add(self, c: Correction) -> bool:
        """Store `c` (already validated); False, storing nothing, if its id was seen before."""
        if c.id in self._ids:
            return False
        self._ids.add(c.id)
        ring = self._rings.get(c.embodiment)
        if ring is None:
            ring = self._rings[c.embodiment] = _Ring(self.capacity)
        ring.append(c)
        return True

    def count(self, embodiment: str) -> int:
        """Corrections of `embodiment` held now (at most the capacity)."""
        ring = self._rings.get(embodiment)
        return 0 if ring is None else len(ring)

    def total_added(self, embodiment: str) -> int:
        """Corrections of `embodiment` ever accepted: monotonic, and a cursor for `since`."""
        ring = self._rings.get(embodiment)
        return 0 if ring is None else ring.total

    def embodiments(self) -> list[str]:
        return sorted(self._rings)

    def items(self, embodiment: str) -> list[Correction]:
        """Held corrections of `embodiment`, oldest first."""
        return self.since(embodiment, 0)

    def since(self, embodiment: str, cursor: int) -> list[Correction]:
        """Corrections added after the first `cursor` ones, oldest first (those already evicted are gone).

        Use `total_added(embodiment)` as the next cursor.
        """
        ring = self._rings.get(embodiment)
        if ring is None:
            return []
        return [ring.get(s) for s in range(max(int(cursor), ring.oldest), ring.total)]

    def sample(
        self,
        embodiment: str,
        n: int,
        rng: np.random.Generator,
        mode: SampleMode = "uniform",
        half_life: float | None = None,
    ) -> list[Correction]:
        """`n` corrections of `embodiment` drawn with replacement ([] if none are held).

        mode "uniform": every held correction equally likely. mode "recency": weight 2^(-age / half_life),
        age counted in corrections (0 = newest); half_life defaults to a quarter of the items held.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        ring = self._rings.get(embodiment)
        if ring is None or n == 0 or len(ring) == 0:
            return []
        size = len(ring)
        if mode == "uniform":
            picks = rng.integers(0, size, size=n)
        elif mode == "recency":
            hl = max(1.0, size / 4) if half_life is None else float(half_life)
            if not hl > 0:
                raise ValueError(f"half_life must be > 0, got {half_life}")
            age = np.arange(size - 1, -1, -1, dtype=np.float64)  # index 0 is the oldest held
            weights = np.exp2(-age / hl)
            picks = rng.choice(size, size=n, p=weights / weights.sum())
        else:
            raise ValueError(f"mode must be 'uniform' or 'recency', got {mode!r}")
        return [ring.get(ring.oldest + int(i)) for i in picks]

    def stats(self) -> dict:
        return {
            "capacity_per_embodiment": self.capacity,
            "ids_seen": len(self._ids),
            "embodiments": {
                name: {"count": len(ring), "total_added": ring.total} for name, ring in sorted(self._rings.items())
            },
        }
