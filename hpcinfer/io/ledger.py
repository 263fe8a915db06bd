"""Resume ledger: what a shard has already answered, read back from its committed files.

Shard directory (``JOBDIR/shards/NNNNN/``)::

    part-000000.jsonl | .parquet | .openai.jsonl   committed results (atomic rename)
    errors.jsonl        bad rows, appended + fsynced at each commit
    .tmp-*              an unfinished commit of a killed run (deleted by recover())
    DONE                every row of the shard is in a part or in errors.jsonl
    FAILED              the input file could not be read (shard-level error, with reason)

There is no separate state file: the committed files *are* the ledger, so it can never
disagree with the outputs. See docs/exactly-once.md for the protocol.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.io.atomic import TEMP_PREFIX, atomic_write_bytes, fsync_dir
from hpcinfer.io.formats import format_of_part, make_format

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
ERRORS_FILE = "errors.jsonl"
DONE_FILE = "DONE"
FAILED_FILE = "FAILED"
PART_RE = re.compile(r"^part-(\d{6})\.(jsonl|parquet|openai\.jsonl)$")


class LedgerError(Exception):
    """The shard directory contradicts the exactly-once protocol (should never happen)."""


class RowSet:
    """Set of row indices as a bitmap: 1 bit per row up to the largest index (a Python set
    costs ~60 bytes per row, which a million-row shard would feel)."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def add(self, index: int) -> bool:
        """Add `index`; False when it was already present."""
        byte, bit = divmod(index, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits))))
        if self._bits[byte] >> bit & 1:
            return False
        self._bits[byte] |= 1 << bit
        self._count += 1
        return True

    def __contains__(self, index: int) -> bool:
        byte, bit = divmod(index, 8)
        return byte < len(self._bits) and bool(self._bits[byte] >> bit & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return (i for i in range(len(self._bits) * 8) if i in self)

    def __eq__(self, other) -> bool:
        return set(self) == set(other)


@dataclass(frozen=True)
class LedgerState:
    done_indices: RowSet            # input row indices with a committed result or error
    next_part: int                  # number for the next part file
    num_results: int
    num_errors: int
    removed_temps: tuple[str, ...]  # leftovers of a killed commit that recover() deleted


def shard_dir(job_dir: str | Path, shard_index: int) -> Path:
    return Path(job_dir) / SHARDS_DIR / f"{shard_index:05d}"


def part_name(number: int, suffix: str) -> str:
    return f"part-{number:06d}{suffix}"


def committed_parts(directory: Path) -> list[Path]:
    """Committed part files, in commit order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PART_RE.match(p.name))


def recover(directory: str | Path) -> LedgerState:
    """Prepare a shard dir for (re)start: delete temps, repair errors.jsonl, read done rows.

    Only the shard's single writer may call this (it deletes temp files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    removed = tuple(sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)))
    for name in removed:
        (directory / name).unlink(missing_ok=True)
    if removed:
        fsync_dir(directory)
        log.info("shard %s: removed %d unfinished commit(s): %s", directory.name,
                 len(removed), ", ".join(removed))
    _repair_tail(directory / ERRORS_FILE)
    return _scan(directory, removed)


def _scan(directory: Path, removed: tuple[str, ...] = ()) -> LedgerState:
    done = RowSet()
    parts = committed_parts(directory)
    for part in parts:
        _add_disjoint(done, _part_indices(part), part.name)
    num_results = len(done)
    _add_disjoint(done, error_indices(directory), ERRORS_FILE)
    next_part = int(PART_RE.match(parts[-1].name).group(1)) + 1 if parts else 0
    return LedgerState(done, next_part, num_results, len(done) - num_results, removed)


def _add_disjoint(done: RowSet, indices: list[int], source: str) -> None:
    for index in indices:
        if not done.add(index):
            raise LedgerError(f"{source} repeats row {index}, which is already committed: "
                              "the shard directory was written by two workers at once or "
                              "edited by hand; move it aside and rerun the shard")


def _part_indices(part: Path) -> list[int]:
    try:
        return make_format(format_of_part(part)).read_indices(part)
    except Exception as exc:  # a committed part must be readable: it was fsynced then renamed
        raise LedgerError(f"committed part {part} is unreadable ({exc}): the filesystem lost "
                          "data; delete this part to recompute its rows") from None


def error_indices(directory: Path) -> list[int]:
    path = Path(directory) / ERRORS_FILE
    if not path.exists():
        return []
    with open(path, "rb") as f:
        return [json.loads(line)["row_index"] for line in f if line.strip()]


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (an append killed mid-write) so the file is whole lines again."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        end = size
        while end > 0:                     # scan back for the last newline, 64 KiB at a time
            start = max(0, end - (1 << 16))
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                break
            end = start
        keep = start + newline + 1 if end > 0 else 0
        if keep != size:
            log.warning("%s: dropping a torn last line of %d bytes (killed mid-append)",
                        path, size - keep)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE_FILE).exists()


def mark_done(directory: str | Path, num_rows: int, fingerprint: str | None = None) -> dict:
    """Write DONE once every one of the shard's `num_rows` rows is committed; else raise.
    ``fingerprint``: the config the rows were answered under (compile/fingerprint.py).

    The check rereads the committed files, so DONE never rests on in-memory state."""
    directory = Path(directory)
    state = _scan(directory)
    if len(state.done_indices) != num_rows:
        raise LedgerError(f"shard {directory}: {len(state.done_indices)} of {num_rows} rows "
                          "are committed; commit the rest before marking it done")
    summary = {"num_rows": num_rows, "num_results": state.num_results,
               "num_errors": state.num_errors}
    if fingerprint:
        summary["fingerprint"] = fingerprint
    atomic_write_bytes(directory / DONE_FILE, (json.dumps(summary) + "\n").encode())
    (directory / FAILED_FILE).unlink(missing_ok=True)   # an earlier run's, since fixed
    return summary


def progress(directory: str | Path) -> dict:
    """Cheap counts for `hpcinfer status` (no row parsing: newline counts, Parquet footers).

    Returns {num_results, num_errors, num_parts, is_done, failed_reason}."""
    directory = Path(directory)
    parts = committed_parts(directory)
    num_results = sum(_count_rows(p) for p in parts)
    errors = directory / ERRORS_FILE
    failed = directory / FAILED_FILE
    return {"num_results": num_results,
            "num_errors": _count_lines(errors) if errors.exists() else 0,
            "num_parts": len(parts), "is_done": is_done(directory),
            "failed_reason": json.loads(failed.read_text())["reason"] if failed.exists() else None}


def _count_rows(part: Path) -> int:
    if part.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_metadata(part).num_rows
    return _count_lines(part)


def _count_lines(path: Path) -> int:
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def mark_failed(directory: str | Path, reason: str) -> None:
    """Record a shard-level error (e.g. ShardReadError) so status and collect can show it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / FAILED_FILE, (json.dumps({"reason": reason}) + "\n").encode())
