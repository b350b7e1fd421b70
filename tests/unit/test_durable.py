"""fleet.durable: the one atomic write (temp file in the same directory, fsync, rename, fsync the directory)."""

from __future__ import annotations

import os
import stat

import pytest

import fleet.durable as durable
from fleet.durable import write_bytes_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path) -> None:
    path = tmp_path / "state.json"
    write_text_atomic(path, '{"a": 1}')
    write_text_atomic(path, '{"a": 2}')
    write_bytes_atomic(tmp_path / "blob.bin", b"\x00\x01")
    assert path.read_text() == '{"a": 2}' and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "state.json"]


def test_mode_is_owner_only_when_asked_else_what_open_would_give(tmp_path) -> None:
    write_text_atomic(tmp_path / "token", "secret", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "token").st_mode) == 0o600
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "plain", "x")
        (tmp_path / "reference").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "reference").st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")

    def no_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(durable.os, "fsync", no_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_directory_must_exist(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "missing" / "f.txt", "x")


def test_publish_without_replace_never_clobbers_and_keeps_the_temp_for_another_try(tmp_path):
    from fleet.durable import durable_temp, publish

    first = durable_temp(tmp_path, b"one", prefix=".tmp-", suffix=".parquet")
    assert first.name.startswith(".tmp-") and first.read_bytes() == b"one"
    publish(first, tmp_path / "part-1", replace=False)
    assert (tmp_path / "part-1").read_bytes() == b"one" and not first.exists()
    second = durable_temp(tmp_path, b"two")
    with pytest.raises(FileExistsError):
        publish(second, tmp_path / "part-1", replace=False)
    assert (tmp_path / "part-1").read_bytes() == b"one" and second.read_bytes() == b"two"
    publish(second, tmp_path / "part-1")  # replace=True: the rename wins
    assert (tmp_path / "part-1").read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["part-1"]
