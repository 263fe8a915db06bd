"""process_shard: the data path's loop with a synchronous answer function instead of an engine.

It is the reference the worker's engine loop follows (recover -> read -> skip done -> write
-> commit -> DONE) and what the kill, memory and benchmark runs drive. The real worker
differs only in that answers come back from the engine out of order, several rows in flight.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from hpcinfer.io import ledger
from hpcinfer.io.formats import JsonlFormat
from hpcinfer.io.readers import ShardReadError, ShardReader
from hpcinfer.io.rows import BadRow, InputRow, InputSpec, OutputRecord
from hpcinfer.io.writers import PartWriter

log = logging.getLogger(__name__)


class BadRowError(Exception):
    """resilience.on_bad_row: fail and the shard met a bad row."""


def process_shard(shard: Any, spec: InputSpec, shard_dir: str | Path, fmt: JsonlFormat,
                  answer: Callable[[InputRow], OutputRecord], *, commit_every_rows: int = 1000,
                  commit_every_s: float = 60.0, on_bad_row: str = "skip") -> dict:
    """Answer every not-yet-committed row of `shard`; returns the DONE summary."""
    shard_dir = Path(shard_dir)
    if ledger.is_done(shard_dir):
        return {"already_done": True}
    state = ledger.recover(shard_dir)
    reader = ShardReader(shard, spec)
    writer = PartWriter(shard_dir, fmt.with_column_types(_column_types(reader, shard_dir)),
                        next_part=state.next_part, commit_every_rows=commit_every_rows,
                        commit_every_s=commit_every_s)
    try:
        for item in reader:
            if item.index in state.done_indices:
                continue
            if isinstance(item, BadRow):
                if on_bad_row == "fail":
                    writer.commit()
                    raise BadRowError(f"{item.file} row {item.index}: {item.reason} "
                                      "(resilience.on_bad_row: fail; use skip to set bad "
                                      "rows aside in errors.jsonl)")
                writer.add_error(item)
            else:
                writer.add_result(item, answer(item))
            writer.maybe_commit()
    except ShardReadError as exc:
        writer.commit()                     # keep what was answered before the file broke
        ledger.mark_failed(shard_dir, str(exc))
        raise
    writer.commit()
    return ledger.mark_done(shard_dir, reader.num_rows)


def _column_types(reader: ShardReader, shard_dir: Path) -> dict:
    try:
        return reader.column_types()
    except ShardReadError as exc:
        ledger.mark_failed(shard_dir, str(exc))
        raise
