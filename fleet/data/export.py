"""Export stored corrections as LeRobot v3.0 datasets that LeRobot's own `LeRobotDataset` loads offline.

    fleet.data.export.export_corrections("runs/fleet/corrections", "runs/corrections-dataset")

One LeRobot dataset per embodiment (a dataset has one fps and fixed feature shapes; bodies differ in both).
An export of one body is that dataset at out_dir; an export of several puts each in out_dir/<embodiment>/ and
lists them in out_dir/export.json ({"layout": "one LeRobot dataset per embodiment", "datasets": {...}}):

    <dataset>/data/chunk-000/file-000.parquet            frames; a new file every `max_frames_per_file`
    <dataset>/meta/info.json                             LeRobot's keys (codebase_version, fps, totals, chunks_size,
                                                         data_files_size_in_mb, video_files_size_in_mb, features ...)
    <dataset>/meta/tasks.parquet                         task_index (int64), indexed by the task text, as pandas
                                                         writes `DataFrame({"task_index": ...}, index=tasks)`
    <dataset>/meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, file and frame ranges
    <dataset>/meta/stats.json                            min/max/mean/std/count per numeric feature (strict JSON:
                                                         `policy_action`'s come from the policy proposals only, and
                                                         are null with count [0] when every episode is a demonstration)

Frame columns: `index` (int64, global frame), `episode_index` (int64), `frame_index` (int64, step k of
the chunk), `timestamp` (float32, k / control_hz: relative to the episode, exact in float32), `task_index` (int64),
`observation.state` (fixed_size_list<float32>[proprio_dim]), `observation.images.cam` (struct<bytes: binary PNG,
path: string>, LeRobot's on-disk form of an image feature), `action` (fixed_size_list<float32>[action_dim],
corrected_chunk[k]: what the human commanded), plus project columns `policy_action` (the same shape,
policy_chunk[k]; NaN where the operator drove with no policy proposal: a demonstration), `embodiment`,
`correction_id`, `robot_id`, `source_episode`, `source_tick`, `head_version`, `reason`, `shift`,
`correction_time_us` (int64 unix microseconds: a float32 tensor would lose a minute of an epoch time) and
`is_observation_frame` (bool).

A correction records one observation, taken when the chunk started: every frame of the episode repeats
it, and `is_observation_frame` is True only at frame 0, the one frame where it is current. Train
chunked policies from frame 0 with the episode's actions as the target chunk (LeRobot: `delta_timestamps`
{"action": [k / fps for k in range(16)]} at frame 0 gives the corrected chunk).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleet.data.correction import Correction, validate_correction
from fleet.data.log import CorrectionLog, read_added_specs
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_KEY = "observation.images.cam"

DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200
# LeRobot's defaults (its info.json names them); the exporter splits files by frames (`max_frames_per_file`)
LAYOUT = "one LeRobot dataset per embodiment"

_IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def frame_schema(spec: EmbodimentSpec) -> pa.Schema:
    """The frame table of one embodiment's dataset: vectors as fixed-size lists, as LeRobot writes them."""
    state, action = pa.list_(pa.float32(), spec.proprio_dim), pa.list_(pa.float32(), spec.action_dim)
    return pa.schema(
        [
            ("index", pa.int64()),
            ("episode_index", pa.int64()),
            ("frame_index", pa.int64()),
            ("timestamp", pa.float32()),
            ("task_index", pa.int64()),
            ("observation.state", state),
            (IMAGE_KEY, _IMAGE_TYPE),
            ("action", action),
            ("policy_action", action),
            ("embodiment", pa.string()),
            ("correction_id", pa.string()),
            ("robot_id", pa.string()),
            ("source_episode", pa.int64()),
            ("source_tick", pa.int64()),
            ("head_version", pa.int64()),
            ("reason", pa.string()),
            ("shift", pa.string()),
            ("correction_time_us", pa.int64()),
            ("is_observation_frame", pa.bool_()),
        ]
    )


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, no filtering), with only numpy and zlib."""
    h, w, _ = image.shape
    raw = np.hstack([np.zeros((h, 1), np.uint8), np.ascontiguousarray(image, np.uint8).reshape(h, -1)])

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def _load(
    source: str | os.PathLike | Iterable[Correction | dict], specs: dict[str, EmbodimentSpec]
) -> list[Correction]:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_dir():
            raise FileNotFoundError(f"correction log directory {source} does not exist")
        return CorrectionLog(source).read_all(specs)
    out, seen = [], set()
    for item in source:
        c = validate_correction(item, specs)
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def _feature(dtype: str, shape: list, names: Any = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "names": names}


def _features(spec: EmbodimentSpec) -> dict[str, dict[str, Any]]:
    action = _feature("float32", [spec.action_dim], list(spec.dim_names))
    return {
        "index": _feature("int64", [1]),
        "episode_index": _feature("int64", [1]),
        "frame_index": _feature("int64", [1]),
        "timestamp": _feature("float32", [1]),
        "task_index": _feature("int64", [1]),
        "observation.state": _feature("float32", [spec.proprio_dim]),
        IMAGE_KEY: _feature("image", [64, 64, 3], ["height", "width", "channels"]),
        "action": action,
        "policy_action": dict(action),
        "embodiment": _feature("string", [1]),
        "correction_id": _feature("string", [1]),
        "robot_id": _feature("string", [1]),
        "source_episode": _feature("int64", [1]),
        "source_tick": _feature("int64", [1]),
        "head_version": _feature("int64", [1]),
        "reason": _feature("string", [1]),
        "shift": _feature("string", [1]),
        "correction_time_us": _feature("int64", [1]),
        "is_observation_frame": _feature("bool", [1]),
    }


def _tasks_table(tasks: dict[str, int]) -> pa.Table:
    """meta/tasks.parquet as pandas writes `DataFrame({"task_index": [...]}, index=pd.Index(tasks, name="task"))`:
    the task text is the index (LeRobot reads `tasks.iloc[task_index].name`), recorded in the pandas metadata."""
    table = pa.table(
        {"task_index": pa.array(list(tasks.values()), pa.int64()), "task": pa.array(list(tasks), pa.string())}
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}},
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }  # fmt: skip
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _finite(values: np.ndarray) -> list:
    """A list for strict JSON: non-finite values (never expected) become null, never `NaN` or `Infinity`."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _stats(values: np.ndarray, dim: int) -> dict[str, list]:
    """min/max/mean/std over the rows of (n, dim) `values` (in float64); null per dimension when n == 0."""
    if len(values) == 0:
        return {"min": [None] * dim, "max": [None] * dim, "mean": [None] * dim, "std": [None] * dim, "count": [0]}
    values = np.asarray(values, np.float64)
    return {
        "min": _finite(values.min(0)),
        "max": _finite(values.max(0)),
        "mean": _finite(values.mean(0)),
        "std": _finite(values.std(0)),
        "count": [int(len(values))],
    }


def _policy_action(c: Correction) -> np.ndarray:
    """What the policy proposed, or NaN of the same (chunk_size, action_dim) shape for a demonstration."""
    if c.policy_chunk is None:
        return np.full(c.corrected_chunk.shape, np.nan, np.float32)
    return c.policy_chunk


def _frames(c: Correction, episode: int, first_index: int, task_index: int, spec: EmbodimentSpec) -> dict[str, list]:
    steps = len(c.corrected_chunk)
    png = {"bytes": encode_png(c.image), "path": None}
    state = c.proprio.tolist()
    return {
        "index": list(range(first_index, first_index + steps)),
        "episode_index": [episode] * steps,
        "frame_index": list(range(steps)),
        "timestamp": [k / spec.control_hz for k in range(steps)],  # per episode: small, exact enough in float32
        "task_index": [task_index] * steps,
        "observation.state": [state] * steps,
        IMAGE_KEY: [png] * steps,
        "action": c.corrected_chunk.tolist(),
        "policy_action": _policy_action(c).tolist(),  # NaN rows: a demonstration (no policy proposal)
        "embodiment": [c.embodiment] * steps,
        "correction_id": [c.id] * steps,
        "robot_id": [c.robot_id] * steps,
        "source_episode": [c.episode] * steps,
        "source_tick": [c.tick] * steps,
        "head_version": [c.head_version] * steps,
        "reason": [c.reason] * steps,
        "shift": [c.shift] * steps,
        "correction_time_us": [round(c.timestamp * 1e6)] * steps,
        "is_observation_frame": [k == 0 for k in range(steps)],
    }


def _write_dataset(
    corrections: list[Correction], root: Path, spec: EmbodimentSpec, max_frames_per_file: int, files_per_chunk: int
) -> dict[str, Any]:
    """One embodiment's corrections as one LeRobot v3.0 dataset at `root`."""
    schema = frame_schema(spec)
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    files: list[str] = []
    pending: dict[str, list] = {name: [] for name in schema.names}

    def flush() -> None:
        k = len(files)
        rel = DATA_PATH.format(chunk_index=k // files_per_chunk, file_index=k % files_per_chunk)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(pending, schema=schema), root / rel)
        files.append(rel)
        for column in pending.values():
            column.clear()

    total = 0
    for ep, c in enumerate(corrections):
        steps = len(c.corrected_chunk)
        if pending["index"] and len(pending["index"]) + steps > max_frames_per_file:
            flush()  # an episode never straddles two files
        task_index = tasks.setdefault(c.instruction, len(tasks))
        for name, values in _frames(c, ep, total, task_index, spec).items():
            pending[name].extend(values)
        k = len(files)
        episodes.append(
            {
                "episode_index": ep,
                "tasks": [c.instruction],
                "length": steps,
                "data/chunk_index": k // files_per_chunk,
                "data/file_index": k % files_per_chunk,
                "dataset_from_index": total,
                "dataset_to_index": total + steps,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
                "embodiment": c.embodiment,
                "correction_id": c.id,
            }
        )
        total += steps
    if pending["index"] or not files:
        flush()  # an empty export still has one (empty) data file, so readers find the schema

    (root / "meta").mkdir(parents=True, exist_ok=True)
    pq.write_table(_tasks_table(tasks), root / "meta" / "tasks.parquet")
    episodes_rel = EPISODES_PATH.format(chunk_index=0, file_index=0)
    (root / episodes_rel).parent.mkdir(parents=True, exist_ok=True)
    ep_schema = pa.schema(
        [
            ("episode_index", pa.int64()),
            ("tasks", pa.list_(pa.string())),
            ("length", pa.int64()),
            ("data/chunk_index", pa.int64()),
            ("data/file_index", pa.int64()),
            ("dataset_from_index", pa.int64()),
            ("dataset_to_index", pa.int64()),
            ("meta/episodes/chunk_index", pa.int64()),
            ("meta/episodes/file_index", pa.int64()),
            ("embodiment", pa.string()),
            ("correction_id", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(episodes, schema=ep_schema), root / episodes_rel)
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": spec.name,
        "total_episodes": len(corrections),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": files_per_chunk,
        "data_files_size_in_mb": DATA_FILES_SIZE_IN_MB,
        "video_files_size_in_mb": VIDEO_FILES_SIZE_IN_MB,
        "fps": spec.control_hz,
        "splits": {"train": f"0:{len(corrections)}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": _features(spec),
        "embodiment": {
            "name": spec.name,
            "action_dim": spec.action_dim,
            "proprio_dim": spec.proprio_dim,
            "action_names": list(spec.dim_names),
            "action_low": list(spec.action_low),
            "action_high": list(spec.action_high),
            "head": spec.head,
            "chunk_size": spec.chunk_size,
        },
        "source": "vla-fleet corrections: one episode per correction, one frame per chunk step",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    if corrections:
        proposals = [c.policy_chunk for c in corrections if c.policy_chunk is not None]  # demonstrations have none
        stats = {
            "observation.state": _stats(np.stack([c.proprio for c in corrections]), spec.proprio_dim),
            "action": _stats(np.concatenate([c.corrected_chunk for c in corrections]), spec.action_dim),
            "policy_action": _stats(
                np.concatenate(proposals) if proposals else np.empty((0, spec.action_dim), np.float32), spec.action_dim
            ),
        }
        (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=2, allow_nan=False))
    return {"total_episodes": len(corrections), "total_frames": total, "total_tasks": len(tasks), "files": files}


def _write_export(
    corrections: list[Correction], root: Path, specs: dict[str, EmbodimentSpec], only: str | None, **split
) -> dict[str, Any]:
    """One body (or `only`): a dataset at root. Several: root/<embodiment>/ each, listed in root/export.json."""
    names = [only] if only else sorted({c.embodiment for c in corrections})
    if len(names) == 1:
        summary = _write_dataset(corrections, root, specs[names[0]], **split)
        return summary | {"embodiments": {names[0]: summary["total_episodes"]}, "datasets": {names[0]: "."}}
    root.mkdir(parents=True, exist_ok=True)
    parts = {
        n: _write_dataset([c for c in corrections if c.embodiment == n], root / n, specs[n], **split) for n in names
    }
    index = {
        "layout": LAYOUT,
        "datasets": {
            n: {"path": n, "episodes": p["total_episodes"], "frames": p["total_frames"]} for n, p in parts.items()
        },
    }
    (root / "export.json").write_text(json.dumps(index, indent=2))
    return {
        "total_episodes": sum(p["total_episodes"] for p in parts.values()),
        "total_frames": sum(p["total_frames"] for p in parts.values()),
        "total_tasks": sum(p["total_tasks"] for p in parts.values()),
        "files": [f"{n}/{f}" for n, p in parts.items() for f in p["files"]],
        "embodiments": {n: p["total_episodes"] for n, p in parts.items()},
        "datasets": {n: n for n in names},
    }


def export_corrections(
    log_dir_or_corrections: str | os.PathLike | Iterable[Correction | dict],
    out_dir: str | os.PathLike,
    *,
    embodiment: str | None = None,
    overwrite: bool = False,
    max_frames_per_file: int = 100_000,
    files_per_chunk: int = 1000,
    specs: dict[str, EmbodimentSpec] | None = None,
) -> dict[str, Any]:
    """Write corrections (a log directory, or Correction objects / dicts) as LeRobot datasets, one per embodiment
    (see the module docstring for the layout); `embodiment` keeps only that body. The export is built in a
    temporary sibling directory and renamed into place, so `out_dir` never holds a half-written export. Refuses
    a non-empty `out_dir` unless `overwrite`. Returns a summary dict ("datasets": embodiment -> path in out_dir).
    """
    specs = EMBODIMENTS if specs is None else specs
    if isinstance(log_dir_or_corrections, (str, os.PathLike)):
        # a fleet's log also holds the bodies `fleet embodiment add` brought in: their specs are kept beside it
        specs = dict(specs) | read_added_specs(log_dir_or_corrections)
    if max_frames_per_file < 1 or files_per_chunk < 1:
        raise ValueError("max_frames_per_file and files_per_chunk must be positive")
    if embodiment is not None and embodiment not in specs:
        raise ValueError(f"embodiment: expected one of {sorted(specs)}, got {embodiment!r}")
    corrections = _load(log_dir_or_corrections, specs)
    if embodiment is not None:
        corrections = [c for c in corrections if c.embodiment == embodiment]
    unknown = sorted({c.embodiment for c in corrections} - set(specs))
    if unknown:
        raise ValueError(f"embodiment: {unknown[0]!r} is not registered; register it before exporting")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    split = {"max_frames_per_file": max_frames_per_file, "files_per_chunk": files_per_chunk}
    try:
        summary = _write_export(corrections, staging, specs, embodiment, **split)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out_dir": str(out), "layout": LAYOUT, **summary}
