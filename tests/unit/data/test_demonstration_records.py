"""Demonstrations in the data layer: a correction with no policy action (`policy_chunk=None`, what a robot in
demonstration mode stores) through validation, Arrow rows and tables, Parquet, the log (old parts included) and
the replay store's restart."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fleet.data.arrow import CORRECTION_SCHEMA, corrections_to_table, from_row, table_to_corrections, to_row
from fleet.data.correction import Correction, CorrectionError, validate_correction
from fleet.data.log import CorrectionLog
from fleet.data.store import ReplayStore
from tests.unit.data.test_data import batch, make


def demo(embodiment: str = "franka", seed: int = 0, **overrides) -> Correction:
    """A demonstration: the operator drove, no policy proposed (policy_chunk None)."""
    return make(embodiment, seed, policy_chunk=None, reason="demo", head_version=0, **overrides)


def test_a_demonstration_keeps_policy_chunk_none_through_validation():
    from fleet.data.correction import is_demonstration

    d = demo("aloha", seed=4)
    assert d.policy_chunk is None and is_demonstration(d) and not is_demonstration(make("aloha", seed=4))
    assert d.corrected_chunk.shape == (16, 14) and not d.corrected_chunk.flags.writeable  # the rest as before
    assert validate_correction(d.to_dict()).policy_chunk is None  # the dict form (what a robot sends) too
    assert validate_correction(d) == d
    raw = {k: v for k, v in d.to_dict().items() if k != "policy_chunk"}
    with pytest.raises(CorrectionError, match=r"^policy_chunk: missing"):  # None is explicit, never implied
        validate_correction(raw)
    # None equals only None: a demonstration never equals the same record with a policy proposal
    proposed = replace(d, policy_chunk=np.zeros((16, 14), np.float32))
    assert d != proposed and proposed != d and validate_correction(proposed) != d
    assert replace(d) == d


def test_a_demonstration_round_trips_through_rows_tables_and_parquet_as_null(tmp_path):
    cs = [make("hello", seed=1), demo("hello", seed=2), make("hello", seed=3), demo("hello", seed=5)]
    assert [from_row(to_row(c)) for c in cs] == cs
    assert to_row(cs[1])["policy_chunk"] is None
    table = corrections_to_table(cs)
    assert table.schema.equals(CORRECTION_SCHEMA) and CORRECTION_SCHEMA.field("policy_chunk").nullable
    assert table.column("policy_chunk").null_count == 2
    back = table_to_corrections(table)
    assert back == cs and back[1].policy_chunk is None and back[0].policy_chunk.shape == (16, 3)
    pq.write_table(table, tmp_path / "t.parquet")
    read = pq.read_table(tmp_path / "t.parquet")
    assert table_to_corrections(read) == cs
    assert [r["policy_chunk"] is None for r in read.to_pylist()] == [False, True, False, True]  # plain pyarrow
    assert table_to_corrections(read.slice(1, 2)) == cs[1:3]  # a sliced (offset) column keeps its nulls


def test_a_log_written_before_demonstrations_still_reads_and_compacts_with_one(tmp_path):
    old_schema = CORRECTION_SCHEMA.set(
        CORRECTION_SCHEMA.get_field_index("policy_chunk"), pa.field("policy_chunk", pa.list_(pa.float32()), False)
    )
    before = batch(3, "franka", 7)
    pq.write_table(
        pa.Table.from_pylist([to_row(c) for c in before], schema=old_schema), tmp_path / "part-00000001.parquet"
    )
    assert not pq.read_schema(tmp_path / "part-00000001.parquet").field("policy_chunk").nullable
    log = CorrectionLog(tmp_path)
    demos = [demo("franka", seed=8), demo("franka", seed=9)]
    log.append(demos)
    assert log.read_all() == before + demos and log.invalid_rows == 0 and log.quarantined == []
    assert log.compact() == 2
    assert CorrectionLog(tmp_path).read_all() == before + demos


def test_store_keeps_a_demonstration_across_a_restart(tmp_path):
    store = ReplayStore(tmp_path)
    cs = [demo("leap", seed=1), make("leap", seed=2), demo("leap", seed=3)]
    reply = store.add([cs[0].to_dict(), cs[1], cs[2]])
    assert reply["accepted"] == [c.id for c in cs] and reply["rejected"] == []
    assert store.since("leap", 0)["corrections"] == cs
    restarted = ReplayStore(tmp_path)  # reloads from the log directory
    assert restarted.loaded_at_start == 3
    back = restarted.since("leap", 0)["corrections"]
    assert back == cs and back[0].policy_chunk is None and back[1].policy_chunk is not None
    assert restarted.add([cs[2]])["duplicates"] == [cs[2].id]
