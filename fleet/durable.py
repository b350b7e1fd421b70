"""The one atomic file write: readers see the old file or the new one, never half of either, even after a crash.

    write_bytes_atomic(path, payload)                    # temp file, write, fsync, rename, fsync the directory
    write_text_atomic(path, json.dumps(state), mode=0o600)   # owner-only from the first byte
    tmp = durable_temp(directory, payload, prefix=".tmp-")   # the two steps apart, for a writer that must
    publish(tmp, directory / "part-7.parquet", replace=False) # never replace a file (the correction log)

The temporary file is a fresh name in the same directory (`tempfile.mkstemp`: O_EXCL, so nobody can plant it
first), called `.<name>.<random>.tmp`, and is removed if anything fails. The directory must exist.
"""

from __future__ import annotations

import errno
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


def durable_temp(
    directory: str | os.PathLike, data: bytes, *, prefix: str = ".", suffix: str = ".tmp", mode: int | None = None
) -> Path:
    """A fresh file in `directory` (O_EXCL name) holding `data`, fsynced but not yet published: `publish` it.

    mode: its permission bits, set before any data is written (0o600: owner-only); None = what `open()`
    would give a new file (0o666 less the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), (0o666 & ~_umask()) if mode is None else mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, replace: bool = True) -> None:
    """Make the durable temp file `tmp` visible as `path` in one step, then fsync the directory.

    replace=True: rename over whatever is there. replace=False: never replace an existing file (a hard link,
    then the temp name is removed): FileExistsError if `path` exists, and `tmp` is kept for another try; on a
    filesystem without hard links, a rename when `path` is absent."""
    tmp, path = Path(tmp), Path(path)
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
            os.replace(tmp, path)
        else:
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (a rename, a new or removed file) durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically and durably (`durable_temp`, then `publish`); `mode` as there."""
    path = Path(path)
    tmp = durable_temp(path.parent, data, prefix=f".{path.name}.", mode=mode)
    try:
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int | None = None, encoding: str = "utf-8") -> None:
    """`write_bytes_atomic` for text (UTF-8 unless `encoding` says otherwise)."""
    write_bytes_atomic(path, text.encode(encoding), mode=mode)
