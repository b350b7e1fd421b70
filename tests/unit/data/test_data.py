"""Correction records, their Arrow rows, the durable log, the replay buffers and the replay store (no Ray)."""

from __future__ import annotations

import inspect
import os
import pathlib
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fleet.data.buffer
from fleet.data.arrow import CORRECTION_SCHEMA, corrections_to_table, from_row, table_to_corrections, to_row
from fleet.data.buffer import CorrectionBuffer
from fleet.data.correction import Correction, CorrectionError, random_correction, validate_correction
from fleet.data.log import CorrectionLog
from fleet.data.store import ReplayStore
from fleet.embodiments import EMBODIMENTS

NAMES = ("franka", "aloha", "hello", "leap")


def make(embodiment: str = "franka", seed: int = 0, **overrides) -> Correction:
    return validate_correction(random_correction(embodiment, np.random.default_rng(seed), **overrides))


def batch(n: int, embodiment: str = "franka", seed: int = 0) -> list[Correction]:
    rng = np.random.default_rng(seed)
    return [validate_correction(random_correction(embodiment, rng)) for _ in range(n)]


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_valid_correction_is_normalized_to_read_only_copies(name):
    raw = random_correction(name, np.random.default_rng(1), proprio=np.zeros(EMBODIMENTS[name].proprio_dim))
    c = validate_correction(raw)
    spec = EMBODIMENTS[name]
    assert c.image.dtype == np.uint8 and c.image.shape == (64, 64, 3)
    assert c.proprio.dtype == np.float32 and c.proprio.shape == (spec.proprio_dim,)  # float64 in, float32 out
    assert c.corrected_chunk.shape == c.policy_chunk.shape == (16, spec.action_dim)
    assert not c.image.flags.writeable and not c.corrected_chunk.flags.writeable
    raw.image[0, 0, 0] ^= 0xFF  # the sender keeps editing its buffer: the stored copy must not change
    assert c.image[0, 0, 0] != raw.image[0, 0, 0]


def _bad(field, value):
    return lambda c: replace(c, **{field: value})


def _with(field, index, value):
    def edit(c):
        arr = np.array(getattr(c, field))
        arr[index] = value
        return replace(c, **{field: arr})

    return edit


MALFORMED = {
    "unknown embodiment": ("embodiment", _bad("embodiment", "spot"), "one of"),
    "wrong proprio dims": ("proprio", _bad("proprio", np.zeros(7, np.float32)), "shape (8,)"),
    "wrong action dims": ("corrected_chunk", _bad("corrected_chunk", np.zeros((16, 6), np.float32)), "(16, 7)"),
    "wrong chunk length": ("policy_chunk", _bad("policy_chunk", np.zeros((8, 7), np.float32)), "(16, 7)"),
    "NaN proprio": ("proprio", _with("proprio", 3, np.nan), "finite"),
    "Inf policy action": ("policy_chunk", _with("policy_chunk", (2, 1), np.inf), "finite"),
    "NaN corrected action": ("corrected_chunk", _with("corrected_chunk", (0, 0), np.nan), "finite"),
    "corrected action out of range": ("corrected_chunk", _with("corrected_chunk", (5, 6), 1.5), "range is [-1.0, 1.0]"),
    "wrong image shape": ("image", _bad("image", np.zeros((32, 32, 3), np.uint8)), "(64, 64, 3)"),
    "grayscale image": ("image", _bad("image", np.zeros((64, 64), np.uint8)), "(64, 64, 3)"),
    "float image": ("image", _bad("image", np.zeros((64, 64, 3), np.float32)), "uint8"),
    "bool chunk": ("policy_chunk", _bad("policy_chunk", np.zeros((16, 7), bool)), "dtype bool"),
    "ragged proprio": ("proprio", _bad("proprio", [[1.0], [1.0, 2.0]]), "ragged"),
    "empty id": ("id", _bad("id", ""), "non-empty"),
    "non-string id": ("id", _bad("id", 17), "a string"),
    "empty robot id": ("robot_id", _bad("robot_id", " "), "non-empty"),
    "negative tick": ("tick", _bad("tick", -1), "non-negative int"),
    "bool episode": ("episode", _bad("episode", True), "non-negative int"),
    "NaN timestamp": ("timestamp", _bad("timestamp", float("nan")), "finite"),
    "empty reason": ("reason", _bad("reason", ""), "non-empty"),
    "huge instruction": ("instruction", _bad("instruction", "x" * 5000), "at most"),
    "non-string shift": ("shift", _bad("shift", None), "a string"),
    "head version": ("head_version", _bad("head_version", 1.5), "non-negative int"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_validation_rejects_with_a_message_naming_the_field(case):
    field, mutate, expected = MALFORMED[case]
    with pytest.raises(CorrectionError) as err:
        validate_correction(mutate(random_correction("franka", np.random.default_rng(0))))
    message = str(err.value)
    assert message.startswith(f"{field}:"), message
    assert expected in message, message


def test_dicts_are_checked_for_missing_and_unknown_fields():
    d = random_correction("hello", np.random.default_rng(0)).to_dict()
    with pytest.raises(CorrectionError, match=r"^image: missing"):
        validate_correction({k: v for k, v in d.items() if k != "image"})
    with pytest.raises(CorrectionError, match=r"^corected_chunk: unknown field"):
        validate_correction({**d, "corected_chunk": d["corrected_chunk"]})
    with pytest.raises(CorrectionError, match=r"^correction: expected a dict"):
        validate_correction(42)


def test_json_style_lists_and_raw_image_bytes_are_accepted():
    c = make("hello")
    d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in c.to_dict().items()}
    assert validate_correction(d) == c
    assert validate_correction({**d, "image": c.image.tobytes()}) == c


def test_policy_chunk_may_leave_the_range_but_corrected_only_within_tolerance():
    spec = EMBODIMENTS["franka"]
    wild = np.full((16, 7), 10.0, np.float32)
    assert validate_correction(make(policy_chunk=wild)).policy_chunk.max() == 10.0
    edge = np.tile(np.asarray(spec.action_high, np.float32), (16, 1))  # float32(0.05) > 0.05
    validate_correction(make(corrected_chunk=edge))
    with pytest.raises(CorrectionError, match="corrected_chunk"):
        validate_correction(make(corrected_chunk=edge * 1.01))


# ---- Arrow rows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_row_and_table_round_trip_is_exact(name, tmp_path):
    cs = batch(4, name, seed=3)
    assert [from_row(to_row(c)) for c in cs] == cs
    table = corrections_to_table(cs)
    assert table.schema.equals(CORRECTION_SCHEMA)
    assert table_to_corrections(table) == cs
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert table_to_corrections(back) == cs
    assert [from_row(r) for r in back.to_pylist()] == cs


def test_rows_are_readable_with_plain_pyarrow_and_numpy(tmp_path):
    c = make("aloha")
    pq.write_table(corrections_to_table([c]), tmp_path / "t.parquet")
    row = pq.read_table(tmp_path / "t.parquet").to_pylist()[0]
    assert len(row["image"]) == 64 * 64 * 3
    np.testing.assert_array_equal(np.frombuffer(row["image"], np.uint8).reshape(64, 64, 3), c.image)
    chunk = np.asarray(row["corrected_chunk"], np.float32).reshape(row["chunk_len"], row["action_dim"])
    np.testing.assert_array_equal(chunk, c.corrected_chunk)
    assert (row["chunk_len"], row["action_dim"]) == (16, 14)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=25, deadline=None)
@given(
    proprio=hnp.arrays(np.float32, 5, elements=finite32),
    policy=hnp.arrays(np.float32, (16, 3), elements=finite32),
    ident=st.text(min_size=1, max_size=40).filter(str.strip),
    instruction=st.text(max_size=60),
    timestamp=st.floats(0, 4e9),
)
def test_round_trip_is_bit_exact_for_any_values(proprio, policy, ident, instruction, timestamp):
    c = make("hello", id=ident, proprio=proprio, policy_chunk=policy, instruction=instruction, timestamp=timestamp)
    back = table_to_corrections(corrections_to_table([c]))[0]
    assert back == c
    assert back.proprio.tobytes() == c.proprio.tobytes() and back.policy_chunk.tobytes() == c.policy_chunk.tobytes()


# ---- the durable log ---------------------------------------------------------------------------------
def test_log_append_and_read_back_in_order(tmp_path):
    log = CorrectionLog(tmp_path)
    first, second = batch(3, "franka", 1), batch(2, "leap", 2)
    assert log.append([]) is None
    assert log.append(first).name == "part-00000001.parquet"
    assert log.append(second).name == "part-00000002.parquet"
    assert log.read_all() == first + second
    assert sorted(os.listdir(tmp_path)) == ["part-00000001.parquet", "part-00000002.parquet"]
    reopened = CorrectionLog(tmp_path)  # a restart resumes the sequence
    assert reopened.append(batch(1, "hello", 3)).name == "part-00000003.parquet"
    assert len(reopened.read_all()) == 6


def test_log_parts_are_plain_parquet(tmp_path):
    CorrectionLog(tmp_path).append(batch(3, "aloha"))
    table = pq.read_table(tmp_path / "part-00000001.parquet")
    assert table.num_rows == 3 and table.schema.names == CORRECTION_SCHEMA.names


def test_leftover_temp_file_from_a_crashed_write_is_ignored_and_reported(tmp_path):
    log = CorrectionLog(tmp_path)
    kept = batch(2, "franka", 1)
    log.append(kept)
    # a crash mid-write: the temp file holds a truncated copy of a real part, never renamed
    whole = (tmp_path / "part-00000001.parquet").read_bytes()
    (tmp_path / ".tmp-deadbeef.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / ".tmp-0000.parquet").write_bytes(b"")
    fresh = CorrectionLog(tmp_path)
    assert fresh.read_all() == kept
    assert fresh.ignored_temp_files == [".tmp-0000.parquet", ".tmp-deadbeef.parquet"]
    assert fresh.stats()["temp_files"] == 2
    assert fresh.append(batch(1, "hello", 2)).name == "part-00000002.parquet"  # still writable
    assert fresh.remove_temp_files() == 2 and fresh.temp_files() == []


def test_a_part_appears_only_by_rename(tmp_path, monkeypatch):
    log = CorrectionLog(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("power lost")

    monkeypatch.setattr(os, "link", crash)  # the crash happens after the fsync, before publishing
    with pytest.raises(OSError, match="power lost"):
        log.append(batch(2))
    monkeypatch.undo()
    assert log.parts() == [] and CorrectionLog(tmp_path).read_all() == []


def test_compaction_merges_parts_and_keeps_order(tmp_path):
    log = CorrectionLog(tmp_path)
    everything = []
    for i in range(4):
        b = batch(3, NAMES[i], seed=i)
        log.append(b)
        everything += b
    assert log.compact() == 4
    assert [p.path.name for p in log.parts()] == ["part-00000001-00000004.parquet"]
    assert log.read_all() == everything
    assert log.append(batch(1, seed=9)).name == "part-00000005.parquet"
    assert CorrectionLog(tmp_path).append(batch(1, seed=10)).name == "part-00000006.parquet"


def test_interrupted_compaction_loses_nothing_and_duplicates_nothing(tmp_path, monkeypatch):
    log = CorrectionLog(tmp_path)
    everything = []
    for i in range(3):
        b = batch(2, "franka", seed=i)
        log.append(b)
        everything += b
    real_unlink = pathlib.Path.unlink
    deleted = []

    def crash_after_first_delete(self, missing_ok=False):
        if self.name.startswith("part-") and deleted:
            raise OSError("killed mid-compaction")
        deleted.append(self.name)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", crash_after_first_delete)
    with pytest.raises(OSError, match="killed mid-compaction"):
        log.compact()
    monkeypatch.undo()
    names = sorted(os.listdir(tmp_path))
    assert names == ["part-00000001-00000003.parquet", "part-00000002.parquet", "part-00000003.parquet"]
    after_crash = CorrectionLog(tmp_path)
    assert after_crash.read_all() == everything  # nothing lost, nothing twice
    assert after_crash.duplicates_skipped == 4
    more = batch(1, "leap", seed=7)
    assert after_crash.append(more).name == "part-00000004.parquet"
    after_crash.compact()  # finishing the job later is also safe
    assert CorrectionLog(tmp_path).read_all() == everything + more
    assert len(os.listdir(tmp_path)) == 1


def test_merged_file_written_but_no_old_part_deleted(tmp_path, monkeypatch):
    log = CorrectionLog(tmp_path)
    everything = batch(2, "aloha", 1) + batch(2, "aloha", 2)
    log.append(everything[:2])
    log.append(everything[2:])

    def crash(self, missing_ok=False):
        raise OSError("killed")

    monkeypatch.setattr(pathlib.Path, "unlink", crash)
    with pytest.raises(OSError):
        log.compact()
    monkeypatch.undo()
    assert len(log.parts()) == 3
    assert log.read_all() == everything


# ---- the in-memory buffer ----------------------------------------------------------------------------
def test_buffer_is_bounded_ring_without_pop_front():
    buf = CorrectionBuffer(capacity_per_embodiment=5)
    cs = batch(12, "franka")
    for c in cs:
        assert buf.add(c)
    buf.add(make("hello"))
    assert buf.count("franka") == 5 and buf.total_added("franka") == 12
    assert buf.items("franka") == cs[-5:]
    assert buf.count("hello") == 1 and buf.count("leap") == 0
    assert len(buf._rings["franka"].slots) == 5  # storage never grows past the capacity
    assert "pop(0)" not in inspect.getsource(fleet.data.buffer)
    assert buf.stats()["embodiments"]["franka"] == {"count": 5, "total_added": 12}


def test_buffer_deduplicates_ids_even_after_eviction():
    buf = CorrectionBuffer(capacity_per_embodiment=2)
    cs = batch(4, "leap")
    assert all(buf.add(c) for c in cs)
    assert not buf.add(cs[0])  # evicted long ago, still a duplicate
    assert not buf.add(replace(cs[3], embodiment="franka"))
    assert buf.total_added("leap") == 4 and buf.count("franka") == 0


def test_since_returns_new_items_after_a_cursor():
    buf = CorrectionBuffer(capacity_per_embodiment=4)
    cs = batch(6, "hello")
    for c in cs[:3]:
        buf.add(c)
    cursor = buf.total_added("hello")
    assert buf.since("hello", 0) == cs[:3]
    for c in cs[3:]:
        buf.add(c)
    assert buf.since("hello", cursor) == cs[3:]
    assert buf.since("hello", 0) == cs[2:]  # the first two were evicted
    assert buf.since("hello", 6) == [] and buf.since("aloha", 0) == []


def test_recency_sampling_favours_new_items():
    buf = CorrectionBuffer(capacity_per_embodiment=100)
    cs = batch(100, "franka")
    for c in cs:
        buf.add(c)
    position = {c.id: i for i, c in enumerate(cs)}
    rng = np.random.default_rng(0)
    recent = [position[c.id] for c in buf.sample("franka", 4000, rng, mode="recency", half_life=10)]
    uniform = [position[c.id] for c in buf.sample("franka", 4000, rng, mode="uniform")]
    newest10 = lambda picks: np.mean(np.asarray(picks) >= 90)  # noqa: E731
    assert newest10(recent) > 0.4  # 2^-0 .. 2^-0.9 of the weight: ~50%
    assert abs(newest10(uniform) - 0.1) < 0.03
    assert np.mean(recent) > np.mean(uniform) + 30
    assert buf.sample("franka", 0, rng) == [] and buf.sample("aloha", 5, rng) == []
    with pytest.raises(ValueError, match="mode"):
        buf.sample("franka", 1, rng, mode="newest")


def test_sampling_is_reproducible_with_a_seed():
    buf = CorrectionBuffer(10)
    for c in batch(10, "aloha"):
        buf.add(c)
    draw = lambda: [c.id for c in buf.sample("aloha", 20, np.random.default_rng(5), mode="recency")]  # noqa: E731
    assert draw() == draw()


# ---- the replay store (the actor's logic, without Ray) -----------------------------------------------
def test_store_acks_duplicates_rejects_and_counts(tmp_path):
    store = ReplayStore(tmp_path, capacity=10)
    good = batch(3, "franka")
    bad = random_correction("franka", np.random.default_rng(9), proprio=np.zeros(3, np.float32))
    reply = store.add([good[0].to_dict(), good[1], good[1], bad, "garbage", {"id": "x", "embodiment": "spot"}])
    assert reply["accepted"] == [good[0].id, good[1].id]
    assert reply["duplicates"] == [good[1].id]
    assert [r["id"] for r in reply["rejected"]] == [bad.id, None, "x"]
    assert reply["rejected"][0]["error"].startswith("proprio:")
    assert reply["rejected"][1]["error"].startswith("correction:")
    again = store.add(good)
    assert again["accepted"] == [good[2].id] and again["duplicates"] == [good[0].id, good[1].id]
    stats = store.stats()
    assert stats["accepted"] == {"franka": 3} and stats["duplicates"] == {"franka": 3}
    assert stats["rejected"] == {"franka": 1, "_unknown": 2} and stats["rejected_total"] == 3
    assert stats["log"]["parts"] == 2
    assert store.counts()["franka"] == {"count": 3, "total_added": 3}
    with pytest.raises(CorrectionError, match="^corrections: expected a list"):
        store.add(None)


def test_store_restart_reloads_exactly_what_was_acknowledged(tmp_path):
    store = ReplayStore(tmp_path, capacity=3)
    acked = []
    for i in range(3):
        reply = store.add(batch(2, NAMES[i % 2], seed=i))
        acked += reply["accepted"]
    cursor = store.since("franka", 0)["cursor"]
    restarted = ReplayStore(tmp_path, capacity=3)
    assert restarted.loaded_at_start == len(acked) == 6
    assert restarted.counts() == store.counts()
    assert restarted.add(store.since("franka", 0)["corrections"])["duplicates"]  # retries still dedup
    new = batch(1, "franka", seed=42)
    restarted.add(new)
    fetched = restarted.since("franka", cursor)  # a learner's cursor survives the restart
    assert fetched["corrections"] == new and fetched["cursor"] == cursor + 1


def test_store_acknowledges_nothing_when_the_write_fails(tmp_path, monkeypatch):
    store = ReplayStore(tmp_path)
    cs = batch(2, "hello")

    def disk_full(corrections):
        raise OSError("No space left on device")

    monkeypatch.setattr(store.log, "append", disk_full)
    with pytest.raises(OSError):
        store.add(cs)
    assert store.counts()["hello"]["total_added"] == 0  # not in memory either: a retry must store it
    monkeypatch.undo()
    assert store.add(cs)["accepted"] == [c.id for c in cs]


def test_store_compacts_every_n_appends_and_cleans_temp_files(tmp_path):
    (tmp_path / ".tmp-crashed.parquet").write_bytes(b"PAR1")
    store = ReplayStore(tmp_path, compact_every=3)
    assert store.stats()["temp_files_removed_at_start"] == 1
    everything = []
    for i in range(7):
        b = batch(1, "leap", seed=i)
        store.add(b)
        everything += b
    assert len(store.log.parts()) < 7
    assert CorrectionLog(tmp_path).read_all() == everything
    store.log.compact = lambda: (_ for _ in ()).throw(OSError("disk hiccup"))
    late = batch(3, "leap", seed=50)
    for c in late:  # a failed compaction does not withdraw the ack of a durable batch
        assert store.add([c])["accepted"] == [c.id]
    assert store.stats()["compaction_errors"] == 1
    everything += late
    since = store.since("leap", 5)
    assert since["corrections"] == everything[5:] and since["missed"] == 0


def test_store_sample_and_since_refuse_unknown_embodiments(tmp_path):
    store = ReplayStore(tmp_path)
    store.add(batch(4, "aloha"))
    assert len(store.sample("aloha", 8, mode="recency", seed=1)) == 8
    assert store.sample("leap", 8) == []
    with pytest.raises(ValueError, match="embodiment"):
        store.sample("spot", 1)
    with pytest.raises(ValueError, match="embodiment"):
        store.since("spot")


def test_store_table_is_plain_arrow(tmp_path):
    store = ReplayStore(tmp_path)
    store.add(batch(2, "franka"))
    table = pa.concat_tables(pq.read_table(p.path) for p in store.log.parts())
    assert table.num_rows == 2
