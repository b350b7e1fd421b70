"""The LeRobot-style exporter: layout, columns and metadata, read back with plain pyarrow."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from fleet.data.correction import random_correction, validate_correction
from fleet.data.export import encode_png, export_corrections, frame_schema
from fleet.data.log import CorrectionLog
from fleet.data.store import ReplayStore
from fleet.embodiments import EMBODIMENTS

COLUMNS = [
    "index",
    "episode_index",
    "frame_index",
    "timestamp",
    "task_index",
    "observation.state",
    "observation.images.cam",
    "action",
    "policy_action",
    "embodiment",
    "correction_id",
    "robot_id",
    "source_episode",
    "source_tick",
    "head_version",
    "reason",
    "shift",
    "correction_time_us",
    "is_observation_frame",
]


def corrections(names=("franka", "aloha", "hello", "leap"), per=2, seed=0):
    rng = np.random.default_rng(seed)
    return [validate_correction(random_correction(n, rng)) for n in names for _ in range(per)]


def read_frames(root):
    files = sorted((root / "data").rglob("*.parquet"))
    return [pq.read_table(f) for f in files]


def test_export_layout_columns_and_values(tmp_path):
    cs = corrections()
    summary = export_corrections(cs, tmp_path / "ds")
    assert summary["total_episodes"] == 8 and summary["total_frames"] == 8 * 16
    assert summary["embodiments"] == {"aloha": 2, "franka": 2, "hello": 2, "leap": 2}
    assert summary["files"] == [f"{n}/data/chunk-000/file-000.parquet" for n in ("aloha", "franka", "hello", "leap")]
    index = json.loads((tmp_path / "ds" / "export.json").read_text())
    assert index["layout"] == "one LeRobot dataset per embodiment" and index["datasets"]["leap"]["episodes"] == 2
    for name in ("aloha", "franka", "hello", "leap"):
        root = tmp_path / "ds" / name
        for rel in ("meta/info.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet"):
            assert (root / rel).is_file(), rel
        (table,) = read_frames(root)
        assert table.schema.names == COLUMNS and table.schema.equals(frame_schema(EMBODIMENTS[name]))
        assert table.column("index").to_pylist() == list(range(32))
        rows = table.to_pylist()
        mine = [c for c in cs if c.embodiment == name]
        for ep, c in enumerate(mine):
            frames = rows[ep * 16 : (ep + 1) * 16]
            assert {r["episode_index"] for r in frames} == {ep}
            assert [r["frame_index"] for r in frames] == list(range(16))
            hz = EMBODIMENTS[c.embodiment].control_hz
            np.testing.assert_allclose([r["timestamp"] for r in frames], np.arange(16) / hz, rtol=1e-6)
            np.testing.assert_array_equal(np.asarray([r["action"] for r in frames], np.float32), c.corrected_chunk)
            np.testing.assert_array_equal(np.asarray([r["policy_action"] for r in frames], np.float32), c.policy_chunk)
            np.testing.assert_array_equal(np.asarray(frames[5]["observation.state"], np.float32), c.proprio)
            assert [r["is_observation_frame"] for r in frames] == [True] + [False] * 15
            assert frames[0]["correction_id"] == c.id and frames[0]["embodiment"] == c.embodiment
            assert frames[0]["source_tick"] == c.tick and frames[0]["correction_time_us"] == round(c.timestamp * 1e6)
        tasks = pq.read_table(root / "meta" / "tasks.parquet").to_pylist()
        task_of = {t["task_index"]: t["task"] for t in tasks}
        assert [task_of[rows[ep * 16]["task_index"]] for ep in range(2)] == [c.instruction for c in mine]


def test_images_are_png_that_decodes_to_the_observation(tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    cs = corrections(("hello",), per=1)
    assert export_corrections(cs, tmp_path / "ds")["datasets"] == {"hello": "."}  # one body: the dataset is out_dir
    cell = read_frames(tmp_path / "ds")[0].column("observation.images.cam")[0].as_py()
    assert cell["path"] is None and cell["bytes"].startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(image_mod.open(io.BytesIO(cell["bytes"]))), cs[0].image)
    assert encode_png(cs[0].image) == cell["bytes"]


def test_info_json_describes_the_dataset(tmp_path):
    export_corrections(corrections(), tmp_path / "ds")
    info = json.loads((tmp_path / "ds" / "leap" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["total_episodes"] == 2 and info["total_frames"] == 32 and info["total_tasks"] >= 1
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["fps"] == 10.0 and info["robot_type"] == "leap"
    assert info["data_files_size_in_mb"] > 0 and info["video_files_size_in_mb"] > 0 and info["video_path"] is None
    assert set(info["features"]) == set(COLUMNS)
    for feature in info["features"].values():
        assert set(feature) == {"dtype", "shape", "names"}
    assert info["features"]["observation.images.cam"]["dtype"] == "image"
    assert info["features"]["action"]["shape"] == [24] and info["embodiment"]["action_dim"] == 24
    aloha = json.loads((tmp_path / "ds" / "aloha" / "meta" / "info.json").read_text())
    assert aloha["fps"] == 20.0 and aloha["features"]["observation.state"]["shape"] == [
        EMBODIMENTS["aloha"].proprio_dim
    ]
    episodes = pq.read_table(tmp_path / "ds" / "leap" / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in episodes] == [16] * 2
    assert episodes[1]["dataset_from_index"] == 16 and episodes[1]["dataset_to_index"] == 32


def test_single_embodiment_export_has_fixed_shapes_and_stats(tmp_path):
    cs = corrections(("franka", "leap"), per=3)
    summary = export_corrections(cs, tmp_path / "ds", embodiment="franka")
    assert summary["total_episodes"] == 3
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["robot_type"] == "franka" and info["fps"] == 10.0
    assert info["features"]["action"]["shape"] == [7]
    assert info["features"]["action"]["names"] == list(EMBODIMENTS["franka"].dim_names)
    assert info["features"]["observation.state"]["shape"] == [8]
    stats = json.loads((tmp_path / "ds" / "meta" / "stats.json").read_text())
    franka = np.concatenate([c.corrected_chunk for c in cs[:3]])
    np.testing.assert_allclose(stats["action"]["max"], franka.max(0), rtol=1e-6)
    assert stats["action"]["count"] == [48]


def test_large_exports_split_files_on_episode_boundaries(tmp_path):
    cs = corrections(("hello",), per=5)
    summary = export_corrections(cs, tmp_path / "ds", max_frames_per_file=40, files_per_chunk=2)
    assert summary["files"] == [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
        "data/chunk-001/file-000.parquet",
    ]
    tables = read_frames(tmp_path / "ds")
    assert sum(t.num_rows for t in tables) == 80
    episodes = pq.read_table(tmp_path / "ds" / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [(e["data/chunk_index"], e["data/file_index"]) for e in episodes] == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0)]


def test_export_from_a_log_directory_and_from_the_store(tmp_path):
    cs = corrections(per=1)
    CorrectionLog(tmp_path / "log").append(cs)
    assert export_corrections(tmp_path / "log", tmp_path / "a")["total_episodes"] == 4
    store = ReplayStore(tmp_path / "log")
    assert store.export(tmp_path / "b")["total_frames"] == 64
    with pytest.raises(FileNotFoundError):
        export_corrections(tmp_path / "missing", tmp_path / "c")


def test_export_refuses_to_clobber_unless_asked(tmp_path):
    cs = corrections(per=1)
    export_corrections(cs, tmp_path / "ds")
    with pytest.raises(FileExistsError):
        export_corrections(cs[:1], tmp_path / "ds")
    assert export_corrections(cs[:1], tmp_path / "ds", overwrite=True)["total_episodes"] == 1
    assert json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())["total_episodes"] == 1  # franka alone
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging or trash directories left


def test_empty_export_is_still_readable(tmp_path):
    summary = export_corrections([], tmp_path / "ds", embodiment="franka")
    assert summary["total_frames"] == 0
    (table,) = read_frames(tmp_path / "ds")
    assert table.num_rows == 0 and table.schema.names == COLUMNS
    nothing = export_corrections([], tmp_path / "none")
    assert nothing["datasets"] == {} and json.loads((tmp_path / "none" / "export.json").read_text())["datasets"] == {}


def _strict_json(path):
    """json.loads as a strict reader does it: NaN / Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"{path.name}: {name} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_demonstrations_export_nan_policy_actions_and_stats_from_the_proposals_only(tmp_path):
    rng = np.random.default_rng(3)
    cs = [
        validate_correction(
            random_correction("franka", rng, **({"policy_chunk": None, "reason": "demo"} if i % 2 else {}))
        )
        for i in range(5)
    ]
    proposed = [c for c in cs if c.policy_chunk is not None]
    assert len(proposed) == 3
    store = ReplayStore(tmp_path / "log")  # through the store's log, as a real export reads it
    assert len(store.add(cs)["accepted"]) == 5
    assert store.export(tmp_path / "ds")["total_frames"] == 5 * 16
    (table,) = read_frames(tmp_path / "ds")
    assert table.schema.equals(frame_schema(EMBODIMENTS["franka"]))  # still a fixed-size float32 feature
    policy = np.asarray(table.column("policy_action").to_pylist(), np.float32).reshape(5, 16, 7)
    for ep, c in enumerate(cs):
        if c.policy_chunk is None:
            assert np.isnan(policy[ep]).all()  # NaN where the operator drove with no policy proposal
        else:
            np.testing.assert_array_equal(policy[ep], c.policy_chunk)
    assert table.column("policy_action").null_count == 0
    stats = _strict_json(tmp_path / "ds" / "meta" / "stats.json")
    assert set(stats) == {"observation.state", "action", "policy_action"}
    proposals = np.concatenate([c.policy_chunk for c in proposed]).astype(np.float64)
    assert stats["policy_action"]["count"] == [48] and stats["action"]["count"] == [80]
    for key, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
        np.testing.assert_allclose(stats["policy_action"][key], fn(proposals, axis=0), rtol=1e-6, atol=1e-9)
        assert len(stats["action"][key]) == 7 and np.isfinite(stats["action"][key]).all()
    _strict_json(tmp_path / "ds" / "meta" / "info.json")


def test_an_export_of_demonstrations_only_has_no_policy_statistics(tmp_path):
    rng = np.random.default_rng(4)
    cs = [
        validate_correction(random_correction(n, rng, policy_chunk=None, reason="demo"))
        for n in ("franka", "leap")
        for _ in range(2)
    ]
    summary = export_corrections(cs, tmp_path / "ds")
    assert summary["total_frames"] == 4 * 16
    for name in ("franka", "leap"):
        dim = EMBODIMENTS[name].action_dim
        (table,) = read_frames(tmp_path / "ds" / name)
        assert np.isnan(np.asarray(table.column("policy_action").to_pylist(), np.float32)).all()
        stats = _strict_json(tmp_path / "ds" / name / "meta" / "stats.json")
        assert stats["policy_action"] == {
            "min": [None] * dim,
            "max": [None] * dim,
            "mean": [None] * dim,
            "std": [None] * dim,
            "count": [0],
        }
        assert stats["action"]["count"] == [32] and len(stats["action"]["mean"]) == dim
        assert stats["observation.state"]["count"] == [2]
