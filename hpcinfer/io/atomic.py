"""Durable file writes: temp name in the same directory -> flush -> fsync -> rename -> fsync(dir).

rename() within one directory is atomic on POSIX, Lustre and GPFS, so a reader (or a
restarted worker) sees either the whole file or no file. Temp names start with ``.tmp-``
and carry the pid, so the ledger can delete leftovers from a killed run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Callable

TEMP_PREFIX = ".tmp-"
# Test-only: seconds to sleep between the fsync of the data and the rename, so a kill test
# can land kill -9 inside a commit. Unset in production.
COMMIT_DELAY_ENV = "HPCINFER_IO_COMMIT_DELAY_S"


def fsync_dir(directory: Path) -> None:
    """Make a rename/create in `directory` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write `path` all-or-nothing: write(f) fills a temp file that is renamed into place."""
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        delay_s = os.environ.get(COMMIT_DELAY_ENV)
        if delay_s:
            time.sleep(float(delay_s))
        os.rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def append_durably(path: Path, data: bytes) -> None:
    """Append `data` and fsync; a torn tail from a kill is repaired by the ledger on start."""
    is_new = not path.exists()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if is_new:
        fsync_dir(path.parent)
