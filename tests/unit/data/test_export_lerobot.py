"""Exports against what LeRobot's loader (`LeRobotDataset`, lerobot-dataset 0.4.4, codebase v3.0) requires.

The first tests check, with pyarrow alone, the files as that loader reads them: info.json's keys, features that
map to `datasets` types (shape [1] -> a scalar, [n] -> a fixed-length sequence, "image" -> {bytes, path}),
tasks.parquet as pandas writes it (the task text is the index), per-episode timestamps exact in float32.
The last runs LeRobot's own loader from its own venv (it pins torch and pandas versions this project's venv
does not have): set FLEET_LEROBOT_PYTHON to that venv's python, e.g.
`python3 -m venv /tmp/lerobot && /tmp/lerobot/bin/pip install lerobot-dataset==0.4.4 torch torchvision`.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleet.data.correction import random_correction, validate_correction
from fleet.data.export import export_corrections
from fleet.embodiments import EMBODIMENTS

# the info.json keys LeRobotDatasetMetadata reads (create_empty_dataset_info's, plus the totals it keeps)
INFO_KEYS = {"codebase_version", "robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size"}
INFO_KEYS |= {"data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path", "video_path"}
INFO_KEYS |= {"features"}
EPISODE_KEYS = {"episode_index", "tasks", "length", "data/chunk_index", "data/file_index"}
EPISODE_KEYS |= {"dataset_from_index", "dataset_to_index"}
ARROW_OF = {"int64": pa.int64(), "float32": pa.float32(), "string": pa.string(), "bool": pa.bool_()}


def mixed(per: int = 3, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for name in EMBODIMENTS:
        for i in range(per):
            c = validate_correction(random_correction(name, rng))
            # two tasks per body, repeated; a realistic epoch time
            out.append(replace(c, instruction=f"task {i % 2} of {name}", timestamp=1.7654321e9 + 12.345678 * i))
    return out


def _check_dataset(root: Path, name: str, cs: list) -> None:
    spec = EMBODIMENTS[name]
    info = json.loads((root / "meta" / "info.json").read_text())
    assert INFO_KEYS <= set(info), INFO_KEYS - set(info)
    assert info["codebase_version"] == "v3.0" and info["fps"] == spec.control_hz and info["robot_type"] == name
    schema = pq.read_schema(root / "data" / "chunk-000" / "file-000.parquet")
    for key, ft in info["features"].items():
        assert set(ft) == {"dtype", "shape", "names"} and all(isinstance(n, int) and n > 0 for n in ft["shape"]), key
        field = schema.field(key).type
        if ft["dtype"] == "image":
            assert field == pa.struct([("bytes", pa.binary()), ("path", pa.string())]) and ft["shape"] == [64, 64, 3]
        elif ft["shape"] == [1]:
            assert field == ARROW_OF[ft["dtype"]], key  # datasets.Value(dtype)
        else:  # datasets.Sequence(length=n): a fixed-size list, as LeRobot writes vectors
            assert pa.types.is_fixed_size_list(field) and field.list_size == ft["shape"][0], key
            assert field.value_type == ARROW_OF[ft["dtype"]], key
    assert info["features"]["action"]["shape"] == [spec.action_dim]
    assert info["features"]["observation.state"]["shape"] == [spec.proprio_dim]

    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]  # pd.read_parquet makes the task text the index
    assert tasks.column("task_index").to_pylist() == list(range(tasks.num_rows))  # iloc[task_index] is that task
    assert sorted(tasks.column("task").to_pylist()) == sorted({c.instruction for c in cs})

    episodes = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert EPISODE_KEYS <= set(episodes.column_names)
    frames = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet").to_pylist()
    task_text = tasks.column("task").to_pylist()
    for ep, c in enumerate(cs):
        rows = [r for r in frames if r["episode_index"] == ep]
        stamps = np.asarray([r["timestamp"] for r in rows], np.float32)
        # LeRobot checks consecutive timestamps 1/fps apart within 1e-4 s, in float32 tensors
        assert stamps[0] == 0 and np.all(np.abs(np.diff(stamps) - 1 / spec.control_hz) < 1e-4)
        assert task_text[rows[0]["task_index"]] == c.instruction
        assert rows[0]["correction_time_us"] == round(c.timestamp * 1e6)  # int64: exact, where float32 is not


def test_every_body_exports_as_a_dataset_lerobots_loader_accepts(tmp_path):
    cs = mixed()
    summary = export_corrections(cs, tmp_path / "ds")
    assert summary["datasets"] == {n: n for n in sorted(EMBODIMENTS)}
    for name in EMBODIMENTS:
        _check_dataset(tmp_path / "ds" / name, name, [c for c in cs if c.embodiment == name])
    export_corrections(cs, tmp_path / "one", embodiment="aloha")
    _check_dataset(tmp_path / "one", "aloha", [c for c in cs if c.embodiment == "aloha"])


LOAD = textwrap.dedent(
    """
    import json, sys, types
    # torchvision's PyPI wheel (built for CUDA torch) cannot load its C ops beside a CPU torch; LeRobot's loader
    # needs only its pure-python transforms, so the C ops' meta registrations are skipped
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import numpy as np
    from ledataset.datasets.lerobot_dataset import LeRobotDataset
    root, chunk = sys.argv[1], int(sys.argv[2])
    fps = json.load(open(root + "/meta/info.json"))["fps"]
    ds = LeRobotDataset("local/fleet-export", root=root, delta_timestamps={"action": [k / fps for k in range(chunk)]})
    out = []
    for ep in range(ds.meta.total_episodes):
        item = ds[int(ds.meta.episodes[ep]["dataset_from_index"])]
        out.append({"task": item["task"], "image": (item["observation.images.cam"].numpy() * 255).round().tolist(),
                    "action": item["action"].numpy().tolist(), "state": item["observation.state"].numpy().tolist(),
                    "t_us": int(item["correction_time_us"])})
    print(json.dumps(out))
    """
)


def test_lerobots_own_loader_reads_every_body(tmp_path):
    python = os.environ.get("FLEET_LEROBOT_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("set FLEET_LEROBOT_PYTHON to a python with lerobot-dataset 0.4.4 (it cannot live in this venv)")
    cs = mixed(per=2)
    export_corrections(cs, tmp_path / "ds")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    for name, spec in EMBODIMENTS.items():
        run = subprocess.run(
            [python, "-c", LOAD, str(tmp_path / "ds" / name), str(spec.chunk_size)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        items = json.loads(run.stdout.strip().splitlines()[-1])
        mine = [c for c in cs if c.embodiment == name]
        assert len(items) == len(mine)
        for item, c in zip(items, mine, strict=True):
            assert item["task"] == c.instruction
            np.testing.assert_array_equal(np.transpose(np.asarray(item["image"]), (1, 2, 0)), c.image)
            np.testing.assert_array_equal(np.asarray(item["action"], np.float32), c.corrected_chunk)
            np.testing.assert_array_equal(np.asarray(item["state"], np.float32), c.proprio)
            assert item["t_us"] == round(c.timestamp * 1e6)
