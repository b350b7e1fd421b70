"""Correction records and their durable store: validation, Arrow rows, the Parquet log, replay buffers.

correction.py  Correction, validate_correction, CorrectionError
arrow.py       CORRECTION_SCHEMA, to_row / from_row (the on-disk row format)
log.py         CorrectionLog: append-only, crash-safe directory of Parquet parts
buffer.py      CorrectionBuffer: bounded per-embodiment rings, dedup, recency sampling
store.py       ReplayStore: the replay actor's logic (validate -> log -> buffer -> ack)
export.py      export_corrections: the stored corrections as a LeRobot-style dataset
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the submodule that defines it; loaded on first use, so that importing one numpy-only submodule
# (a robot building a Correction) does not load pyarrow through store.py and arrow.py
_EXPORTS = {
    "CORRECTION_SCHEMA": "arrow",
    "corrections_to_table": "arrow",
    "from_row": "arrow",
    "table_to_corrections": "arrow",
    "to_row": "arrow",
    "CorrectionBuffer": "buffer",
    "IMAGE_SHAPE": "correction",
    "Correction": "correction",
    "CorrectionError": "correction",
    "random_correction": "correction",
    "validate_correction": "correction",
    "CorrectionLog": "log",
    "CorrectionLogError": "log",
    "LogPart": "log",
    "ReplayStore": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fleet.data.{module}"), name)
