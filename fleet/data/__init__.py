"""Correction records and their durable store (import from the submodules; the package itself loads nothing,
so a robot can build a Correction without loading pyarrow): validation, Arrow rows, the Parquet log, replay buffers.

correction.py  Correction, validate_correction, CorrectionError
arrow.py       CORRECTION_SCHEMA, to_row / from_row (the on-disk row format)
log.py         CorrectionLog: append-only, crash-safe directory of Parquet parts
buffer.py      CorrectionBuffer: bounded per-embodiment rings, dedup, recency sampling
store.py       ReplayStore: the replay actor's logic (validate -> log -> buffer -> ack)
export.py      export_corrections: the stored corrections as a LeRobot-style dataset
"""
