"""The durable correction log: a directory of immutable Parquet parts, one per acknowledged batch.

A part appears only by an atomic rename of a complete, fsynced file, so a crash at any moment leaves
the log readable: at worst a `.tmp-*` file that readers ignore. Reading deduplicates by correction id,
which makes compaction (write the merged part, then delete the old ones) safe to interrupt.

Reading streams (`iter_all`: one record batch of one part in memory at a time) and trusts nothing on disk:
every row is validated again as a new correction would be, and a row that fails is skipped and counted. A
part that cannot be read (torn by a disk fault, foreign, corrupt) is moved to `quarantine/` beside a note of
why, counted, and the rows read from it before the fault are written again as a new part, so one bad file
never stops a store from starting.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fleet.data.arrow import CORRECTION_SCHEMA, corrections_to_table, table_to_corrections
from fleet.data.correction import Correction, CorrectionError, validate_correction
from fleet.durable import durable_temp, fsync_dir, publish, write_text_atomic
from fleet.embodiments import BUILTIN_EMBODIMENTS, EmbodimentSpec

log = logging.getLogger(__name__)

_PART_RE = re.compile(r"^part-(\d{8,})(?:-(\d{8,}))?\.parquet$")
TEMP_PREFIX = ".tmp-"
QUARANTINE = "quarantine"
# where unreadable parts are moved (beside a `<part>.why.json`); never read back
READ_BATCH_ROWS = 256
# rows decoded at a time while reading a part


class CorrectionLogError(RuntimeError):
    """The log directory holds something that should never be there (an unreadable part)."""


@dataclass(frozen=True, order=True)
class LogPart:
    """One published file: `part-<start>.parquet` (one batch) or `part-<start>-<end>.parquet` (compacted)."""

    start: int
    # first batch sequence number it holds
    end: int
    # last batch sequence number it holds (== start for a single batch)
    path: Path
    # where it lies


class CorrectionLog:
    """Append-only log of corrections under `directory` (created if missing).

    One writer at a time: the replay store. Two writers cannot overwrite each other's parts (a part is
    published with a no-clobber hard link), but they would interleave sequence numbers.
    """

    def __init__(self, directory: str | os.PathLike, *, publish_delay_s: float = 0.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.publish_delay_s = publish_delay_s
        # fault injection for tests: sleep between the fsync of a temp file and its rename
        self.ignored_temp_files: list[str] = []
        # temp files the last read_all() skipped (a write that crashed before its rename)
        self.duplicates_skipped = 0
        # rows the last read_all() dropped as repeats of an id (an interrupted compaction)
        self.invalid_rows = 0
        # rows the last read skipped because they no longer pass validate_correction
        self.quarantined: list[dict] = []
        # parts the last read moved to quarantine/: {"part", "error", "rows_salvaged"}
        self._next_seq = max((p.end for p in self.parts() + self._quarantined_parts()), default=0) + 1

    # ---- listing ------------------------------------------------------------------------------
    def parts(self) -> list[LogPart]:
        """Published parts in log order (by first sequence number)."""
        found = []
        for entry in os.scandir(self.directory):
            m = _PART_RE.match(entry.name)
            if m and entry.is_file():
                start = int(m.group(1))
                found.append(LogPart(start, int(m.group(2) or start), Path(entry.path)))
        return sorted(found)

    def _quarantined_parts(self) -> list[LogPart]:
        """Parts already set aside: their numbers are never reused."""
        folder = self.directory / QUARANTINE
        if not folder.is_dir():
            return []
        found = []
        for entry in os.scandir(folder):
            m = _PART_RE.match(entry.name)
            if m:
                found.append(LogPart(int(m.group(1)), int(m.group(2) or m.group(1)), Path(entry.path)))
        return found

    def temp_files(self) -> list[Path]:
        """Leftovers of writes that crashed before their rename: never part of the log."""
        return sorted(Path(e.path) for e in os.scandir(self.directory) if e.name.startswith(TEMP_PREFIX))

    def remove_temp_files(self) -> int:
        """Delete leftover temp files (only safe while no other writer is mid-append); returns how many."""
        removed = 0
        for path in self.temp_files():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def stats(self) -> dict[str, int]:
        parts = self.parts()
        return {
            "parts": len(parts),
            "bytes": sum(p.path.stat().st_size for p in parts),
            "temp_files": len(self.temp_files()),
            "quarantined": len(self._quarantined_parts()),
            "next_seq": self._next_seq,
        }

    # ---- writing ------------------------------------------------------------------------------
    def _write_temp(self, table: pa.Table) -> Path:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        tmp = durable_temp(self.directory, sink.getvalue().to_pybytes(), prefix=TEMP_PREFIX, suffix=".parquet")
        if self.publish_delay_s:
            time.sleep(self.publish_delay_s)
        return tmp

    def append(self, corrections: Sequence[Correction]) -> Path | None:
        """Write one new part holding `corrections`; when this returns they are durable. None if empty."""
        if not corrections:
            return None
        tmp = self._write_temp(corrections_to_table(corrections))
        try:
            while True:
                final = self.directory / f"part-{self._next_seq:08d}.parquet"
                try:
                    publish(tmp, final, replace=False)  # never replaces an existing part
                    break
                except FileExistsError:
                    # another writer took this number: skip past everything published so far
                    self._next_seq = max([self._next_seq, *(p.end for p in self.parts())]) + 1
        finally:
            tmp.unlink(missing_ok=True)
        self._next_seq += 1
        return final

    # ---- reading ------------------------------------------------------------------------------
    def _read_part(self, part: LogPart) -> pa.Table:
        try:
            return pq.read_table(part.path, schema=CORRECTION_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise CorrectionLogError(f"{part.path}: unreadable log part ({exc})") from exc

    def iter_part(self, part: LogPart) -> Iterator[Correction]:
        """The rows of one part, a row group at a time (decoded READ_BATCH_ROWS rows at a time); CorrectionLogError
        where it cannot be read, after the rows of the row groups before the fault."""
        try:
            reader = pq.ParquetFile(part.path)
            for group in range(reader.num_row_groups):
                table = reader.read_row_group(group)
                for start in range(0, table.num_rows, READ_BATCH_ROWS):
                    yield from table_to_corrections(table.slice(start, READ_BATCH_ROWS))
        except (OSError, pa.ArrowException, CorrectionError, ValueError, KeyError, TypeError) as exc:
            raise CorrectionLogError(f"{part.path.name}: unreadable log part ({type(exc).__name__}: {exc})") from exc

    def quarantine(self, part: LogPart, error: str) -> Path:
        """Move `part` out of the log into quarantine/, with a note saying why; returns where it went."""
        folder = self.directory / QUARANTINE
        folder.mkdir(exist_ok=True)
        target = folder / part.path.name
        n = 1
        while target.exists():
            n += 1
            target = folder / f"{part.path.stem}.{n}{part.path.suffix}"
        write_text_atomic(target.with_name(target.name + ".why.json"), json.dumps({"error": error, "at": time.time()}))
        os.replace(part.path, target)
        fsync_dir(self.directory)
        fsync_dir(folder)
        return target

    def iter_all(self, specs: dict[str, EmbodimentSpec] | None = None) -> Iterator[Correction]:
        """Every stored correction once, in the order it was appended, streamed part by part; rows that fail
        validation are skipped (`invalid_rows`), unreadable parts quarantined (`quarantined`) with their
        readable rows written again as a new part. Only the log's writer may iterate with quarantining, and
        only before it appends (the replay store does so when it starts)."""
        self.ignored_temp_files = [p.name for p in self.temp_files()]
        if self.ignored_temp_files:
            log.warning(
                "correction log %s: ignoring %d leftover temp file(s) from interrupted writes: %s",
                self.directory,
                len(self.ignored_temp_files),
                self.ignored_temp_files,
            )
        seen: set[str] = set()
        self.duplicates_skipped = self.invalid_rows = 0
        self.quarantined = []
        for part in self.parts():
            salvaged: list[Correction] = []  # this part's rows so far: rewritten if the part turns out bad
            try:
                for c in self.iter_part(part):
                    try:
                        c = validate_correction(c, specs)
                    except CorrectionError as exc:
                        self.invalid_rows += 1
                        log.warning("correction log %s: skipping an invalid row: %s", part.path.name, exc)
                        continue
                    salvaged.append(c)
                    if c.id in seen:
                        self.duplicates_skipped += 1
                        continue
                    seen.add(c.id)
                    yield c
            except CorrectionLogError as exc:
                self._set_aside(part, str(exc), salvaged)

    def _set_aside(self, part: LogPart, error: str, salvaged: list[Correction]) -> None:
        if salvaged:
            self.append(salvaged)  # durable again before the bad file leaves the log
        where = self.quarantine(part, error)
        self.quarantined.append({"part": part.path.name, "error": error, "rows_salvaged": len(salvaged)})
        log.error("correction log %s: %s moved to %s (%d rows salvaged)", self.directory, error, where, len(salvaged))

    def read_all(self, specs: dict[str, EmbodimentSpec] | None = None) -> list[Correction]:
        """Every stored correction once, in the order it was appended (see `iter_all`); for export and tests."""
        return list(self.iter_all(specs))

    # ---- compaction ---------------------------------------------------------------------------
    def compact(self, small_bytes: int = 16 * 1024 * 1024) -> int:
        """Merge each run of consecutive parts smaller than `small_bytes` into one part.

        The merged part is published (temp, fsync, rename) before the old parts are deleted; a crash in
        between leaves rows in two parts, which read_all deduplicates. Returns how many parts were removed.
        """
        runs: list[list[LogPart]] = [[]]
        run_bytes = 0
        for part in self.parts():
            size = part.path.stat().st_size
            if size < small_bytes and run_bytes < small_bytes:  # a merged part stays below ~2 x small_bytes
                runs[-1].append(part)
                run_bytes += size
            elif runs[-1]:
                runs.append([part] if size < small_bytes else [])
                run_bytes = size if size < small_bytes else 0
        removed = 0
        for run in runs:
            if len(run) < 2:
                continue
            seen: set[str] = set()
            merged: list[pa.Table] = []
            for part in run:
                table = self._read_part(part)
                keep = []
                for i, ident in enumerate(table.column("id").to_pylist()):
                    if ident not in seen:
                        seen.add(ident)
                        keep.append(i)
                merged.append(table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64())))
            final = self.directory / f"part-{run[0].start:08d}-{max(p.end for p in run):08d}.parquet"
            tmp = self._write_temp(pa.concat_tables(merged))
            publish(tmp, final)  # may replace an earlier merge of the same run: a subset of this one
            for part in run:
                if part.path != final:
                    part.path.unlink(missing_ok=True)
                    removed += 1
            fsync_dir(self.directory)
        return removed


ADDED_FILE = "embodiments.json"
# beside a log's parts: the specs of bodies added to the fleet at run time ({name: EmbodimentSpec.to_dict()}), written
# by the replay store (ReplayStore.register_embodiment) so the log can be validated without the fleet's registry


def read_added_specs(directory: str | os.PathLike) -> dict[str, EmbodimentSpec]:
    """The added bodies' specs kept beside the log in `directory` ({} when there are none). A malformed file or
    entry is logged and skipped: the pretrained bodies' records stay readable."""
    try:
        raw = json.loads((Path(directory) / ADDED_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("correction log %s: %s unreadable, added bodies skipped: %s", directory, ADDED_FILE, exc)
        return {}
    out = {}
    for d in raw.values() if isinstance(raw, dict) else []:
        try:
            spec = EmbodimentSpec.from_dict(d)
        except (TypeError, ValueError, AttributeError) as exc:
            log.warning("correction log %s: an added body was skipped: %s", directory, exc)
            continue
        if spec.name not in BUILTIN_EMBODIMENTS:
            out[spec.name] = spec
    return out
