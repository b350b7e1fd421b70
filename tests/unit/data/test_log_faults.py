"""The replay store starts from a damaged log (no Ray): unreadable parts are quarantined and counted, their
readable rows kept, rows that no longer validate skipped and counted, and the log is streamed into the
bounded buffers rather than loaded whole."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fleet.data.arrow import CORRECTION_SCHEMA, corrections_to_table, to_row
from fleet.data.correction import random_correction, validate_correction
from fleet.data.log import QUARANTINE, CorrectionLog
from fleet.data.store import ReplayStore


def batch(n: int, embodiment: str = "franka", seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [validate_correction(random_correction(embodiment, rng)) for _ in range(n)]


def corrupt_row_group(path, group: int) -> None:
    """Overwrite the start of one row group's image column with garbage."""
    meta = pq.ParquetFile(path).metadata
    offset = meta.row_group(group).column(CORRECTION_SCHEMA.names.index("image")).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 200] = b"\xab" * 200
    path.write_bytes(bytes(data))


def test_a_store_starts_from_corrupt_and_truncated_parts_and_quarantines_them(tmp_path) -> None:
    log = CorrectionLog(tmp_path)
    good = [batch(5, seed=s) for s in range(3)]
    parts = [log.append(b) for b in good]
    truncated = parts[1]
    truncated.write_bytes(truncated.read_bytes()[:1000])
    # a part in row groups whose last one is corrupt: the rows before the fault are kept
    damaged = batch(30, seed=7)
    pq.write_table(corrections_to_table(damaged), tmp_path / "part-00000009.parquet", row_group_size=10)
    corrupt_row_group(tmp_path / "part-00000009.parquet", 2)
    (tmp_path / "part-00000010.parquet").write_bytes(b"not parquet at all")

    store = ReplayStore(tmp_path, capacity=100)  # before: the constructor raised CorrectionLogError
    held = {c.id for c in store.buffer.items("franka")}
    assert held == {c.id for c in good[0] + good[2] + damaged[:20]}
    stats = store.stats()
    quarantined = {q["part"]: q for q in stats["quarantined_at_start"]}
    assert set(quarantined) == {truncated.name, "part-00000009.parquet", "part-00000010.parquet"}
    assert quarantined["part-00000009.parquet"]["rows_salvaged"] == 20
    assert stats["log"]["quarantined"] == 3
    folder = tmp_path / QUARANTINE
    assert (folder / truncated.name).exists()
    assert "unreadable" in json.loads((folder / f"{truncated.name}.why.json").read_text())["error"]
    # the salvaged rows are durable again, and the next start finds nothing to set aside
    again = ReplayStore(tmp_path, capacity=100)
    assert {c.id for c in again.buffer.items("franka")} == held
    assert again.stats()["quarantined_at_start"] == []
    assert again.add(batch(1, seed=99))["accepted"]  # and it keeps working


def test_rows_read_back_are_validated_again(tmp_path) -> None:
    rows = [to_row(c) for c in batch(3)]
    rows[1]["corrected_chunk"] = [50.0] * len(rows[1]["corrected_chunk"])  # far outside franka's range
    rows[2]["embodiment"] = "spot"  # no such body
    pq.write_table(pa.Table.from_pylist(rows, schema=CORRECTION_SCHEMA), tmp_path / "part-00000001.parquet")
    store = ReplayStore(tmp_path, capacity=10)
    assert [c.id for c in store.buffer.items("franka")] == [rows[0]["id"]]
    assert store.stats()["invalid_rows_at_start"] == 2


def test_the_log_is_streamed_into_the_bounded_buffers(tmp_path) -> None:
    log = CorrectionLog(tmp_path)
    for s in range(20):
        log.append(batch(40, seed=s))  # 800 corrections, ~10 MB of images
    tracemalloc.start()
    store = ReplayStore(tmp_path, capacity=20, compact_every=None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.loaded_at_start == 800 and store.buffer.count("franka") == 20
    # loading it whole held all 800 (> 10 MB); streaming holds the buffer and one part
    assert peak < 4 << 20, f"peak {peak / 1e6:.1f} MB"
