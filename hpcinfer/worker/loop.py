"""The shard loop: stream a shard's rows through LLMEngine, commit results as they finish.

It is ``hpcinfer.io.shard_loop.process_shard`` with the engine in place of the answer
function: recover -> read -> skip done rows -> admit up to ``max_in_flight`` requests ->
step -> write finished rows -> commit every N rows / T seconds -> DONE. New rows join while
others run (continuous batching); at most ``max_in_flight`` rows are held, so memory stays
flat however large the shard.

On the stop flag the loop stops admitting, reads back the engine's last launched step
(``LLMEngine.drain``: async scheduling reports a finished row one step late), aborts what is
still in flight (those rows are not written, so they are redone after the requeue), commits
what finished, and returns
"stopped". The exactly-once argument is docs/exactly-once.md: only the committed files say
what is done.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcinfer.io import ledger
from hpcinfer.io.images import RowImageLoader
from hpcinfer.io.readers import ShardReadError, ShardReader
from hpcinfer.io.rows import BadRow, InputRow
from hpcinfer.io.shard_loop import BadRowError
from hpcinfer.io.writers import PartWriter
from hpcinfer.worker.budget import BudgetExceeded
from hpcinfer.worker.prefetch import END, NOT_READY, Prefetch
from hpcinfer.worker.requests import RequestBuilder, _has_pil_parts, to_output_record

log = logging.getLogger("hpcinfer.worker")
# Rows with decoded images held ahead of the loop: enough to refill a step's finished rows,
# few enough that large scans (a 2000x2000 RGB page is 12 MB decoded) keep memory flat.
PREFETCH_IMAGE_ROWS = 32


@dataclass(frozen=True)
class LoopOptions:
    commit_every_rows: int = 1000
    commit_every_s: float = 60.0
    on_bad_row: str = "skip"              # skip | fail
    max_in_flight: int = 512               # rows held in the engine at once
    step_delay_s: float = 0.0              # test hook only (setup.step_delay_s)
    # The task's budget.BadRowBudget (input.max_bad_rows), shared by its shards' loops; the
    # loops only count into it. None: no budget.
    bad_row_budget: Any = None
    fingerprint: str | None = None        # the job dir's config fingerprint, recorded in DONE


class ShardLoop:
    """One shard's run. ``run()`` returns "done", "already_done" or "stopped"; it raises
    ShardReadError (shard FAILED, marked), BadRowError (on_bad_row: fail) or its subclass
    BudgetExceeded (more bad rows than input.max_bad_rows: shard FAILED, marked)."""

    def __init__(self, engine, shard, spec, shard_dir: Path, fmt, builder: RequestBuilder,
                 stop, progress, options: LoopOptions):
        self.engine = engine
        self.shard = shard
        self.spec = spec
        self.shard_dir = Path(shard_dir)
        self.fmt = fmt
        self.builder = builder
        self.stop = stop
        self.progress = progress
        self.options = options
        self.in_flight: dict[str, tuple[InputRow, Any]] = {}   # request id -> (row, params)

    def run(self) -> str:
        if ledger.is_done(self.shard_dir):
            return "already_done"
        state = ledger.recover(self.shard_dir)
        reader = ShardReader(self.shard, self.spec)
        writer = self._writer(reader, state.next_part)
        try:
            finished = self._stream(reader, state.done_indices, writer)
        except ShardReadError as exc:
            self._abort_all()
            writer.commit()                 # keep what was answered before the file broke
            ledger.mark_failed(self.shard_dir, str(exc))
            raise
        except BudgetExceeded as exc:       # too many bad rows: keep what finished, then fail
            self._read_back(writer)
            self._abort_all()
            writer.commit()
            ledger.mark_failed(self.shard_dir, str(exc))
            raise
        except BaseException:
            self._abort_all()
            raise
        if not finished:
            self._read_back(writer)
            self._abort_all()
            writer.commit()
            return "stopped"
        writer.commit()
        summary = ledger.mark_done(self.shard_dir, reader.num_rows,
                                   fingerprint=self.options.fingerprint)
        log.info("shard %05d done: %d results, %d bad rows", self.shard.index,
                 summary["num_results"], summary["num_errors"])
        return "done"

    def _writer(self, reader: ShardReader, next_part: int) -> PartWriter:
        try:
            column_types = reader.column_types()
        except ShardReadError as exc:
            ledger.mark_failed(self.shard_dir, str(exc))
            raise
        return PartWriter(self.shard_dir, self.fmt.with_column_types(column_types),
                          next_part=next_part, commit_every_rows=self.options.commit_every_rows,
                          commit_every_s=self.options.commit_every_s)

    def _stream(self, reader: ShardReader, done, writer: PartWriter) -> bool:
        """Admit, step, write until the shard is answered (True) or the flag is set (False)."""
        rows = self._rows(reader, done)
        try:
            return self._admit_and_step(rows, done, writer)
        finally:
            if isinstance(rows, Prefetch):
                rows.close()

    def _rows(self, reader: ShardReader, done):
        """The shard's rows; a row with images for a model that takes none becomes a bad row.
        When the model takes images, a reader thread ahead of the step loop
        (worker/prefetch.py) reads each row, decodes its images (PIL) and builds its request
        (the processor: placeholder expansion, resize, normalisation, in a worker process when
        there are any, multimodal/workers.py), so the step loop only admits it; rows already
        done (a rerun) are not processed again."""
        loader = RowImageLoader(self.spec.media_dirs, self.spec.max_images,
                                takes_images=getattr(self.builder, "multimodal", None) is not None)
        if not loader.takes_images:
            return map(loader.load, reader)

        def prepare(raw):
            row = loader.load(raw)
            if isinstance(row, BadRow) or row.index in done:
                return row
            return _Prepared(row, self.builder.build(row))
        return Prefetch(reader, prepare,
                        depth=min(self.options.max_in_flight, PREFETCH_IMAGE_ROWS))

    def _next_row(self, rows):
        """The next row (None after the last); from a reader thread, NOT_READY when it has
        not got the next one yet while the engine has rows to run: the loop steps meanwhile
        instead of waiting (the first steps start before a large max_in_flight is read)."""
        if not isinstance(rows, Prefetch):
            return next(rows, None)
        item = rows.get(block=not self.in_flight)
        return None if item is END else item

    def _admit_and_step(self, rows, done, writer: PartWriter) -> bool:
        exhausted = False
        while not self.stop.is_set:
            while not exhausted and len(self.in_flight) < self.options.max_in_flight:
                item = self._next_row(rows)
                if item is NOT_READY:
                    break
                if item is None:
                    exhausted = True
                elif item.index not in done:
                    self._admit(item, writer)
                if self.stop.is_set:
                    return False
            if exhausted and not self.in_flight:
                return True
            self._write_finished(self.engine.step(final_only=True), writer)
            if writer.should_commit():
                writer.commit()
            self.progress.tick()
            if self.options.step_delay_s:
                time.sleep(self.options.step_delay_s)
        return False

    def _write_finished(self, outputs, writer: PartWriter) -> None:
        for out in outputs:
            if out.finished:
                row, params = self.in_flight.pop(out.request_id)
                writer.add_result(row, to_output_record(out, params))
                self.progress.add_rows(1)

    def _read_back(self, writer: PartWriter) -> None:
        """On the stop flag, before aborting: with async scheduling the engine reports a
        step's finished rows one step later, so the last launched step is read back (no new
        step is launched) and its finished rows are written and committed, not redone.
        Under a replica's driver (TP/PP) async scheduling is off and this reads nothing, so
        followers have nothing to replay. Engines that answer each call in full (the
        pooling engine, test fakes) have no ``drain``."""
        drain = getattr(self.engine, "drain", None)
        if drain is not None:
            self._write_finished(drain(final_only=True), writer)

    def _admit(self, item: InputRow | BadRow | _Prepared, writer: PartWriter) -> None:
        if isinstance(item, _Prepared):   # built in the reader thread
            item, request = item.row, item.request
        else:
            request = item if isinstance(item, BadRow) else self.builder.build(item)
        if not isinstance(request, BadRow):
            request_id = f"{self.shard.index}:{item.index}"
            try:
                self.engine.add_request(request_id, request.prompt, request.params,
                                        lora_request=request.lora_request)
            except ValueError as exc:      # the engine's own checks (vocab, length)
                request = BadRow(item.index, item.file, item.id, "engine_rejected", str(exc),
                                 "")
            else:
                if request.num_truncated_tokens:
                    log.info("row %d of %s: prompt truncated by %d tokens (on_long_prompt)",
                             item.index, item.file, request.num_truncated_tokens)
                self.in_flight[request_id] = (_without_images(item), request.params)
                return
        self._bad(request, writer)

    def _bad(self, bad: BadRow, writer: PartWriter) -> None:
        """errors.jsonl (committed like results), or stop the shard with on_bad_row: fail."""
        if self.options.on_bad_row == "fail":
            writer.commit()
            raise BadRowError(f"{bad.file} row {bad.index}: {bad.reason} "
                              "(resilience.on_bad_row: fail; use skip to set bad rows aside "
                              "in errors.jsonl)")
        writer.add_error(bad)
        self.progress.add_rows(1, num_errors=1)
        if self.options.bad_row_budget is not None:
            self.options.bad_row_budget.add(bad.to_record())   # raises past the budget
        if writer.should_commit():
            writer.commit()

    def _abort_all(self) -> None:
        if self.in_flight:
            log.info("aborting %d in-flight rows of shard %05d (redone on restart)",
                     len(self.in_flight), self.shard.index)
            self.engine.abort_request(list(self.in_flight))
            self.in_flight.clear()


@dataclass(frozen=True)
class _Prepared:
    """A row and its request (or its BadRow), built in the reader thread."""
    row: InputRow
    request: Any

    @property
    def index(self) -> int:
        return self.row.index


def _without_images(row: InputRow) -> InputRow:
    """The row as held until it is answered: the writers need its index and id (and body),
    not its decoded images, which the engine's request already holds as processor tensors,
    so up to max_in_flight rows do not keep a second, decoded copy of their images."""
    if not row.images and not _has_pil_parts(row.messages):
        return row
    return dataclasses.replace(row, images=(), messages=None)
