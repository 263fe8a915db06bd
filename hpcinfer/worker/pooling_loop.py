"""The pooling shard loop: a shard's rows through PoolingEngine (embed/classify/score/reward).

Same ledger contract as ``loop.ShardLoop`` (docs/exactly-once.md): recover -> read -> skip
committed rows -> answer -> PartWriter -> commit every N rows / T s -> DONE. A pooling
request is one forward pass and nothing after, so there is no continuous batching: rows are
taken in chunks of ``max_in_flight`` and each chunk goes to the engine's own method (the code
behind ``LLM.embed`` & co., which batches by tokens itself), so job output equals the Python
API's row for row. On the stop flag the loop stops between chunks, commits what it has, and
returns "stopped".

A row the engine would refuse (over-long with on_long_prompt: error, outside the vocabulary)
is checked alone before its chunk runs and goes to errors.jsonl, so one bad row never fails
the chunk around it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcinfer.io.readers import ShardReader
from hpcinfer.io.rows import BadRow, InputRow, excerpt
from hpcinfer.io.writers import PartWriter
from hpcinfer.worker.loop import LoopOptions, ShardLoop

log = logging.getLogger("hpcinfer.worker")


@dataclass(frozen=True, slots=True)
class PoolingRecord:
    """One row's pooling result, as formats.PoolingJsonlFormat writes it."""
    value: Any                 # embedding / probs: [float]; score: float; reward: [[float]]
    num_prompt_tokens: int


class PoolingShardLoop(ShardLoop):
    """One shard's run. ``run()`` (ShardLoop's: recover, stream, commit, DONE) returns "done",
    "already_done" or "stopped"; it raises ShardReadError (shard FAILED, marked) or
    BadRowError (on_bad_row: fail). Only the streaming differs: chunks, not steps."""

    def __init__(self, engine, task: str, shard, spec, shard_dir: Path, fmt, stop, progress,
                 options: LoopOptions, on_long_prompt: str = "error"):
        from hpcinfer.engine.pooling import PoolingParams
        super().__init__(engine, shard, spec, shard_dir, fmt, None, stop, progress, options)
        self.task = task
        self.params = PoolingParams()
        # -1: cut every input to max_model_len (vLLM's truncate_prompt_tokens=-1)
        self.truncate = -1 if on_long_prompt == "truncate" else None

    def _stream(self, reader: ShardReader, done, writer: PartWriter) -> bool:
        """Chunks of rows through the engine until the shard is answered (True) or the stop
        flag is set (False)."""
        chunk: list[InputRow] = []
        for item in reader:
            if self.stop.is_set:
                return False
            if item.index in done:
                continue
            if isinstance(item, InputRow):
                item = self._checked(item)
            if isinstance(item, BadRow):
                self._bad(item, writer)
                continue
            chunk.append(item)
            if len(chunk) >= self.options.max_in_flight:
                self._answer(chunk, writer)
                chunk = []
        if chunk and not self.stop.is_set:
            self._answer(chunk, writer)
        return not self.stop.is_set

    def _answer(self, rows: list[InputRow], writer: PartWriter) -> None:
        """One chunk: the engine's task method, results written in row order."""
        engine, params, truncate = self.engine, self.params, self.truncate
        texts = [r.texts[0] for r in rows]
        if self.task == "embed":
            outs = engine.embed(texts, params, truncate)
            values = [o.outputs.embedding for o in outs]
        elif self.task == "classify":
            outs = engine.classify(texts, params, truncate)
            values = [o.outputs.probs for o in outs]
        elif self.task == "score":
            outs = engine.score(texts, [r.texts[1] for r in rows], params, truncate)
            values = [float(o.outputs.score) for o in outs]
        else:
            outs = engine.reward(texts, params, truncate)
            values = [o.outputs.data.tolist() for o in outs]
        for row, out, value in zip(rows, outs, values):
            writer.add_result(row, PoolingRecord(value, len(out.prompt_token_ids)))
        self.progress.add_rows(len(rows))
        if writer.should_commit():
            writer.commit()
        self.progress.tick()
        if self.options.step_delay_s:
            time.sleep(self.options.step_delay_s)

    def _checked(self, row: InputRow) -> InputRow | BadRow:
        """The row, or the BadRow the engine's checks (length, vocabulary) make of it."""
        engine = self.engine
        try:
            if self.task == "score" and hasattr(engine.model, "compute_scores"):
                engine.tokenize_pair(row.texts[0], row.texts[1], row.index, self.truncate)
            else:
                for text in row.texts:
                    engine.tokenize(text, row.index, self.truncate)
        except ValueError as exc:
            too_long = "max_model_len" in str(exc)
            reason = (f"{exc} (in a job file: set resilience.on_long_prompt: truncate, or "
                      "raise model.max_model_len)" if too_long else str(exc))
            return BadRow(row.index, row.file, row.id,
                          "prompt_too_long" if too_long else "engine_rejected", reason,
                          excerpt(list(row.texts)))
        return row
