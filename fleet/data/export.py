"""Export stored corrections as a LeRobot v3-style dataset that pyarrow (or LeRobot tooling) can read.

    fleet.data.export.export_corrections("runs/replay-log", "runs/corrections-dataset")

Layout (LeRobot v3.0 conventions, one episode per correction, one frame per step of its chunk):

    out_dir/data/chunk-000/file-000.parquet            frames; a new file every `max_frames_per_file`
    out_dir/meta/info.json                             codebase_version, fps, totals, features, embodiments
    out_dir/meta/tasks.parquet                         task_index (int64), task (string: the instruction)
    out_dir/meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, file and frame ranges
    out_dir/meta/stats.json                            min/max/mean/std/count per numeric feature
                                                       (only when a single embodiment is exported)

Frame columns: `index` (int64, global frame), `episode_index` (int64), `frame_index` (int64, step k of
the chunk), `timestamp` (float32, k / control_hz), `task_index` (int64), `observation.state`
(list<float32>, proprio), `observation.images.cam` (struct<bytes: binary PNG, path: string>, LeRobot's
on-disk form of an image feature), `action` (list<float32>, corrected_chunk[k]: what the human
commanded), plus project columns `policy_action` (list<float32>, policy_chunk[k]), `embodiment`,
`correction_id`, `robot_id`, `source_episode`, `source_tick`, `head_version`, `reason`, `shift`,
`correction_timestamp` (float64 unix seconds) and `is_observation_frame` (bool).

A correction records one observation, taken when the chunk started: every frame of the episode repeats
it, and `is_observation_frame` is True only at frame 0, the one frame where it is current. Train
chunked policies from frame 0 with the episode's actions as the target chunk. With several embodiments
in one export, `action` and `observation.state` lengths vary by row (filter on `embodiment`); their
features then have shape [null] and per-embodiment shapes, names and fps are in info["embodiments"].
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
from fleet.data.log import CorrectionLog
from fleet.embodiments import EMBODIMENTS, EmbodimentSpec

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
IMAGE_KEY = "observation.images.cam"

_IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
FRAME_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("episode_index", pa.int64()),
        ("frame_index", pa.int64()),
        ("timestamp", pa.float32()),
        ("task_index", pa.int64()),
        ("observation.state", pa.list_(pa.float32())),
        (IMAGE_KEY, _IMAGE_TYPE),
        ("action", pa.list_(pa.float32())),
        ("policy_action", pa.list_(pa.float32())),
        ("embodiment", pa.string()),
        ("correction_id", pa.string()),
        ("robot_id", pa.string()),
        ("source_episode", pa.int64()),
        ("source_tick", pa.int64()),
        ("head_version", pa.int64()),
        ("reason", pa.string()),
        ("shift", pa.string()),
        ("correction_timestamp", pa.float64()),
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
        return CorrectionLog(source).read_all()
    out, seen = [], set()
    for item in source:
        c = validate_correction(item, specs)
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


def _feature(dtype: str, shape: list, names: Any = None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "names": names}


def _features(specs: list[EmbodimentSpec]) -> dict[str, dict[str, Any]]:
    one = specs[0] if len(specs) == 1 else None
    action = _feature("float32", [one.action_dim] if one else [None], list(one.dim_names) if one else None)
    state = _feature("float32", [one.proprio_dim] if one else [None])
    return {
        "index": _feature("int64", [1]),
        "episode_index": _feature("int64", [1]),
        "frame_index": _feature("int64", [1]),
        "timestamp": _feature("float32", [1]),
        "task_index": _feature("int64", [1]),
        "observation.state": state,
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
        "correction_timestamp": _feature("float64", [1]),
        "is_observation_frame": _feature("bool", [1]),
    }


def _stats(values: np.ndarray) -> dict[str, list]:
    return {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [int(len(values))],
    }


def _frames(c: Correction, episode: int, first_index: int, task_index: int, spec: EmbodimentSpec) -> dict[str, list]:
    steps = len(c.corrected_chunk)
    png = {"bytes": encode_png(c.image), "path": None}
    state = c.proprio.tolist()
    return {
        "index": list(range(first_index, first_index + steps)),
        "episode_index": [episode] * steps,
        "frame_index": list(range(steps)),
        "timestamp": [k / spec.control_hz for k in range(steps)],
        "task_index": [task_index] * steps,
        "observation.state": [state] * steps,
        IMAGE_KEY: [png] * steps,
        "action": c.corrected_chunk.tolist(),
        "policy_action": c.policy_chunk.tolist(),
        "embodiment": [c.embodiment] * steps,
        "correction_id": [c.id] * steps,
        "robot_id": [c.robot_id] * steps,
        "source_episode": [c.episode] * steps,
        "source_tick": [c.tick] * steps,
        "head_version": [c.head_version] * steps,
        "reason": [c.reason] * steps,
        "shift": [c.shift] * steps,
        "correction_timestamp": [c.timestamp] * steps,
        "is_observation_frame": [k == 0 for k in range(steps)],
    }


def _write_dataset(
    corrections: list[Correction],
    root: Path,
    specs: dict[str, EmbodimentSpec],
    max_frames_per_file: int,
    files_per_chunk: int,
) -> dict[str, Any]:
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    files: list[str] = []
    pending: dict[str, list] = {name: [] for name in FRAME_SCHEMA.names}

    def flush() -> None:
        k = len(files)
        rel = DATA_PATH.format(chunk_index=k // files_per_chunk, file_index=k % files_per_chunk)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(pending, schema=FRAME_SCHEMA), root / rel)
        files.append(rel)
        for column in pending.values():
            column.clear()

    total = 0
    for ep, c in enumerate(corrections):
        spec = specs[c.embodiment]
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
                "embodiment": c.embodiment,
                "correction_id": c.id,
            }
        )
        total += steps
    if pending["index"] or not files:
        flush()  # an empty export still has one (empty) data file, so readers find the schema

    (root / "meta").mkdir(parents=True, exist_ok=True)
    task_table = pa.table(
        {"task_index": pa.array(list(tasks.values()), pa.int64()), "task": pa.array(list(tasks), pa.string())}
    )
    pq.write_table(task_table, root / "meta" / "tasks.parquet")
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
            ("embodiment", pa.string()),
            ("correction_id", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(episodes, schema=ep_schema), root / episodes_rel)

    names = sorted({c.embodiment for c in corrections})
    used = [specs[n] for n in names]
    hz = {s.control_hz for s in used}
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": names[0] if len(names) == 1 else ("mixed" if names else None),
        "total_episodes": len(corrections),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": files_per_chunk,
        "fps": hz.pop() if len(hz) == 1 else None,
        "splits": {"train": f"0:{len(corrections)}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": _features(used),
        "embodiments": {
            s.name: {
                "action_dim": s.action_dim,
                "proprio_dim": s.proprio_dim,
                "action_names": list(s.dim_names),
                "action_low": list(s.action_low),
                "action_high": list(s.action_high),
                "fps": s.control_hz,
                "head": s.head,
                "episodes": sum(1 for c in corrections if c.embodiment == s.name),
            }
            for s in used
        },
        "source": "vla-fleet corrections: one episode per correction, one frame per chunk step",
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    if len(used) == 1:
        stats = {
            "observation.state": _stats(np.stack([c.proprio for c in corrections])),
            "action": _stats(np.concatenate([c.corrected_chunk for c in corrections])),
            "policy_action": _stats(np.concatenate([c.policy_chunk for c in corrections])),
        }
        (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
    return {
        "total_episodes": len(corrections),
        "total_frames": total,
        "total_tasks": len(tasks),
        "files": files,
        "embodiments": {n: info["embodiments"][n]["episodes"] for n in names},
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
    """Write corrections (a log directory, or Correction objects / dicts) as a LeRobot-style dataset.

    `embodiment` keeps only that body (fixed feature shapes, a LeRobot-loadable dataset). The dataset
    is built in a temporary sibling directory and renamed into place, so `out_dir` never holds a
    half-written export. Refuses a non-empty `out_dir` unless `overwrite`. Returns a summary dict.
    """
    specs = EMBODIMENTS if specs is None else specs
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
    try:
        summary = _write_dataset(corrections, staging, specs, max_frames_per_file, files_per_chunk)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"out_dir": str(out), **summary}
