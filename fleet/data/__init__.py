"""Correction records and their durable store: validation, Arrow rows, the Parquet log, replay buffers.

correction.py  Correction, validate_correction, CorrectionError
arrow.py       CORRECTION_SCHEMA, to_row / from_row (the on-disk row format)
log.py         CorrectionLog: append-only, crash-safe directory of Parquet parts
buffer.py      CorrectionBuffer: bounded per-embodiment rings, dedup, recency sampling
store.py       ReplayStore: the replay actor's logic (validate -> log -> buffer -> ack)
export.py      export_corrections: the stored corrections as a LeRobot-style dataset
"""

from fleet.data.arrow import CORRECTION_SCHEMA, corrections_to_table, from_row, table_to_corrections, to_row
from fleet.data.buffer import CorrectionBuffer
from fleet.data.correction import IMAGE_SHAPE, Correction, CorrectionError, random_correction, validate_correction
from fleet.data.log import CorrectionLog, CorrectionLogError, LogPart
from fleet.data.store import ReplayStore

__all__ = [
    "CORRECTION_SCHEMA",
    "IMAGE_SHAPE",
    "Correction",
    "CorrectionBuffer",
    "CorrectionError",
    "CorrectionLog",
    "CorrectionLogError",
    "LogPart",
    "ReplayStore",
    "corrections_to_table",
    "from_row",
    "random_correction",
    "table_to_corrections",
    "to_row",
    "validate_correction",
]
