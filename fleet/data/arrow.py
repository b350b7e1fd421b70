"""The on-disk row format of a correction: a flat Arrow schema any pyarrow reader understands.

Arrays are flattened so no project code is needed to read a log:

    image            binary        12288 raw bytes, uint8, row-major (64, 64, 3) = H x W x RGB
    proprio          list<float32> proprio_dim values
    policy_chunk     list<float32> chunk_len * action_dim values, row-major (step, dim); null for a
                                   demonstration (the operator drove, no policy proposed)
    corrected_chunk  list<float32> same layout; reshape with the `chunk_len` and `action_dim` columns

`np.frombuffer(row["image"], np.uint8).reshape(64, 64, 3)` and
`np.asarray(row["corrected_chunk"], np.float32).reshape(row["chunk_len"], row["action_dim"])` recover them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from fleet.data.correction import IMAGE_SHAPE, Correction, CorrectionError

SCHEMA_VERSION = "1"

CORRECTION_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("robot_id", pa.string(), nullable=False),
        pa.field("embodiment", pa.string(), nullable=False),
        pa.field("episode", pa.int64(), nullable=False),
        pa.field("tick", pa.int64(), nullable=False),
        pa.field("timestamp", pa.float64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("proprio", pa.list_(pa.float32()), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("chunk_len", pa.int32(), nullable=False),
        pa.field("action_dim", pa.int32(), nullable=False),
        pa.field("policy_chunk", pa.list_(pa.float32()), nullable=True),  # null: a demonstration
        pa.field("corrected_chunk", pa.list_(pa.float32()), nullable=False),
        pa.field("head_version", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("shift", pa.string(), nullable=False),
    ],
    metadata={
        "fleet.schema": "correction",
        "fleet.schema_version": SCHEMA_VERSION,
        "fleet.image_layout": "uint8 row-major (64, 64, 3) HWC RGB, raw bytes",
        "fleet.chunk_layout": "float32 row-major (chunk_len, action_dim), flattened",
    },
)


def to_row(c: Correction) -> dict[str, Any]:
    """A flat dict of Python builtins matching CORRECTION_SCHEMA (expects a validated correction)."""
    chunk_len, action_dim = c.corrected_chunk.shape
    return {
        "id": c.id,
        "robot_id": c.robot_id,
        "embodiment": c.embodiment,
        "episode": c.episode,
        "tick": c.tick,
        "timestamp": c.timestamp,
        "image": np.ascontiguousarray(c.image, dtype=np.uint8).tobytes(),
        "proprio": np.asarray(c.proprio, np.float32).tolist(),
        "instruction": c.instruction,
        "chunk_len": int(chunk_len),
        "action_dim": int(action_dim),
        "policy_chunk": None if c.policy_chunk is None else np.asarray(c.policy_chunk, np.float32).ravel().tolist(),
        "corrected_chunk": np.asarray(c.corrected_chunk, np.float32).ravel().tolist(),
        "head_version": c.head_version,
        "reason": c.reason,
        "shift": c.shift,
    }


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _chunk(values: Any, chunk_len: int, action_dim: int, field: str) -> np.ndarray:
    if values is None:
        raise CorrectionError(f"{field}: expected {chunk_len} x {action_dim} values, got null")
    arr = np.asarray(values, dtype=np.float32)
    if arr.size != chunk_len * action_dim:
        raise CorrectionError(f"{field}: expected {chunk_len} x {action_dim} values, got {arr.size}")
    return _readonly(arr.reshape(chunk_len, action_dim).copy())


def from_row(row: dict[str, Any]) -> Correction:
    """Inverse of `to_row` (also accepts a row read back by pyarrow's `to_pylist`); a null `policy_chunk` is None."""
    image = bytes(row["image"])
    if len(image) != math.prod(IMAGE_SHAPE):
        raise CorrectionError(f"image: expected {math.prod(IMAGE_SHAPE)} bytes, got {len(image)}")
    chunk_len, action_dim = int(row["chunk_len"]), int(row["action_dim"])
    policy = row["policy_chunk"]  # None (null): a demonstration
    return Correction(
        id=row["id"],
        robot_id=row["robot_id"],
        embodiment=row["embodiment"],
        episode=int(row["episode"]),
        tick=int(row["tick"]),
        timestamp=float(row["timestamp"]),
        image=_readonly(np.frombuffer(image, dtype=np.uint8).reshape(IMAGE_SHAPE).copy()),
        proprio=_readonly(np.asarray(row["proprio"], dtype=np.float32).copy()),
        instruction=row["instruction"],
        policy_chunk=None if policy is None else _chunk(policy, chunk_len, action_dim, "policy_chunk"),
        corrected_chunk=_chunk(row["corrected_chunk"], chunk_len, action_dim, "corrected_chunk"),
        head_version=int(row["head_version"]),
        reason=row["reason"],
        shift=row["shift"],
    )


def corrections_to_table(corrections: Sequence[Correction]) -> pa.Table:
    """A table of CORRECTION_SCHEMA, one row per correction."""
    return pa.Table.from_pylist([to_row(c) for c in corrections], schema=CORRECTION_SCHEMA)


_LIST_COLUMNS = ("proprio", "policy_chunk", "corrected_chunk")


def _split_list(column: pa.ChunkedArray) -> list[np.ndarray | None]:
    """list<float32> column -> one float32 array per row (None for a null row), without a Python float per value."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return [values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(arr))]
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(arr))]


def table_to_corrections(table: pa.Table) -> list[Correction]:
    """Rows of a CORRECTION_SCHEMA table back to corrections (column-wise, fast for large tables)."""
    missing = [n for n in CORRECTION_SCHEMA.names if n not in table.column_names]
    if missing:
        raise CorrectionError(f"{missing[0]}: column missing from the correction table")
    table = table.select(CORRECTION_SCHEMA.names).cast(CORRECTION_SCHEMA)
    cols: dict[str, list] = {}
    for name in CORRECTION_SCHEMA.names:
        if name in _LIST_COLUMNS:
            cols[name] = _split_list(table.column(name))
        else:
            cols[name] = table.column(name).to_pylist()
    return [from_row({n: cols[n][i] for n in cols}) for i in range(table.num_rows)]
