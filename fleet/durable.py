"""The one atomic file write: readers see the old file or the new one, never half of either, even after a crash.

    write_bytes_atomic(path, payload)                    # temp file, write, fsync, rename, fsync the directory
    write_text_atomic(path, json.dumps(state), mode=0o600)   # owner-only from the first byte

The temporary file is a fresh name in the same directory (`tempfile.mkstemp`: O_EXCL, so nobody can plant it
first), called `.<name>.<random>.tmp`, and is removed if anything fails. The directory must exist.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """This process's umask, read without changing it where the OS allows (/proc on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically and durably.

    mode: the new file's permission bits, set before any data is written (0o600: owner-only); None = what
    `open()` would give a new file (0o666 less the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), (0o666 & ~_umask()) if mode is None else mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, encoding: str = "utf-8") -> None:
    """`write_bytes_atomic` for text (UTF-8 unless `encoding` says otherwise)."""
    write_bytes_atomic(path, text.encode(encoding), mode=mode)
