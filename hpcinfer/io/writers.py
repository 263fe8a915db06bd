"""PartWriter: the single writer of a shard directory's results and errors.

Results and bad rows accumulate in memory; ``commit()`` makes them durable:

1. bad rows are appended to errors.jsonl in one write, then fsynced;
2. results go to ``part-NNNNNN.<ext>`` via temp -> flush -> fsync -> rename -> fsync(dir).

Each step is all-or-nothing for the rows it carries and the two never share a row, so a
kill -9 anywhere leaves every row either committed once or not at all (redone on restart).
The worker commits when ``should_commit()`` says so (every N rows or T seconds) and at once
on the requeue signal. Typical loop::

    state = ledger.recover(shard_dir)
    writer = PartWriter(shard_dir, make_format("jsonl", id_name="id"), next_part=state.next_part)
    for item in ShardReader(shard, spec):
        if item.index in state.done_indices: continue
        ... writer.add_error(bad) / writer.add_result(row, out); writer.maybe_commit()
    writer.commit(); ledger.mark_done(shard_dir, reader.num_rows)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from hpcinfer.io.atomic import append_durably, atomic_write
from hpcinfer.io.formats import JsonlFormat, dumps_line
from hpcinfer.io.ledger import ERRORS_FILE, part_name
from hpcinfer.io.rows import BadRow, InputRow, OutputRecord

log = logging.getLogger(__name__)


class PartWriter:
    def __init__(self, shard_dir: str | Path, fmt: JsonlFormat, *, next_part: int = 0,
                 commit_every_rows: int = 1000, commit_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.shard_dir = Path(shard_dir)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.format = fmt
        self.next_part = next_part
        self.commit_every_rows = commit_every_rows
        self.commit_every_s = commit_every_s
        self._clock = clock
        self._last_commit_s = clock()
        self._results: list[dict] = []
        self._errors: list[dict] = []
        self.num_committed_results = 0
        self.num_committed_errors = 0

    @property
    def num_pending(self) -> int:
        return len(self._results) + len(self._errors)

    def add_result(self, row: InputRow, out: OutputRecord) -> None:
        self._results.append(self.format.record(row, out))

    def add_error(self, bad: BadRow) -> None:
        self._errors.append(bad.to_record())

    def should_commit(self) -> bool:
        if not self.num_pending:
            return False
        return (self.num_pending >= self.commit_every_rows
                or self._clock() - self._last_commit_s >= self.commit_every_s)

    def maybe_commit(self) -> list[Path]:
        return self.commit() if self.should_commit() else []

    def commit(self) -> list[Path]:
        """Make every pending row durable; returns the files written (may be empty)."""
        written: list[Path] = []
        if self._errors:
            path = self.shard_dir / ERRORS_FILE
            append_durably(path, "".join(map(dumps_line, self._errors)).encode("utf-8"))
            self.num_committed_errors += len(self._errors)
            self._errors = []
            written.append(path)
        if self._results:
            path = self.shard_dir / part_name(self.next_part, self.format.suffix)
            results = self._results
            atomic_write(path, lambda f: self.format.write(results, f))
            self.next_part += 1
            self.num_committed_results += len(results)
            self._results = []
            written.append(path)
        self._last_commit_s = self._clock()
        if written:
            log.debug("committed %s", ", ".join(p.name for p in written))
        return written
