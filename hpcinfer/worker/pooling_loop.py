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
the chunk around it; should the engine still refuse a chunk (e.g. ``dimensions`` above the
model's embedding size), its rows are redone one by one and only the refused ones are bad.

OpenAI-batch rows (``/v1/embeddings``, ``/v1/score``) may carry several inputs and their own
options (dimensions, normalize, truncate_prompt_tokens, use_activation): a chunk's rows are
grouped by options, each group's inputs go to the engine in one call, and each row gets the
list of its inputs' results. Options a request leaves out are the engine's PoolerConfig
(the job's ``pooling:`` block), as in vLLM.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcinfer.io import openai_batch
from hpcinfer.io.readers import ShardReader
from hpcinfer.io.rows import BadRow, InputRow, excerpt
from hpcinfer.io.writers import PartWriter
from hpcinfer.worker.loop import LoopOptions, ShardLoop

log = logging.getLogger("hpcinfer.worker")


@dataclass(frozen=True, slots=True)
class PoolingRecord:
    """One row's pooling result, as formats.PoolingJsonlFormat writes it."""
    value: Any                 # embedding / probs: [float]; score: float; reward: [[float]];
    num_prompt_tokens: int     # an OpenAI row: a list, one of those per input


@dataclass(frozen=True)
class _Call:
    """One row's share of an engine call."""
    inputs: list               # texts or token-id lists; score: (text_1, text_2) pairs
    params: Any                # PoolingParams
    truncate: int | None       # truncate_prompt_tokens
    is_openai: bool            # the row's result is a list (one per input)


class PoolingShardLoop(ShardLoop):
    """One shard's run. ``run()`` (ShardLoop's: recover, stream, commit, DONE) returns "done",
    "already_done" or "stopped"; it raises ShardReadError (shard FAILED, marked) or
    BadRowError (on_bad_row: fail). Only the streaming differs: chunks, not steps."""

    def __init__(self, engine, task: str, shard, spec, shard_dir: Path, fmt, stop, progress,
                 options: LoopOptions, on_long_prompt: str = "error"):
        from hpcinfer.engine.pooling import PoolingParams
        super().__init__(engine, shard, spec, shard_dir, fmt, None, stop, progress, options)
        self.task = task
        # None everywhere: the engine fills in its PoolerConfig (the job's pooling: block)
        self.params = PoolingParams()
        # -1: cut every input to max_model_len (vLLM's truncate_prompt_tokens=-1)
        self.truncate = -1 if on_long_prompt == "truncate" else None

    def _stream(self, reader: ShardReader, done, writer: PartWriter) -> bool:
        """Chunks of rows through the engine until the shard is answered (True) or the stop
        flag is set (False)."""
        chunk: list[tuple[InputRow, _Call]] = []
        for item in reader:
            if self.stop.is_set:
                return False
            if item.index in done:
                continue
            if isinstance(item, InputRow):
                call = self._call(item)
                item = self._checked(item, call)
            if isinstance(item, BadRow):
                self._bad(item, writer)
                continue
            chunk.append((item, call))
            if len(chunk) >= self.options.max_in_flight:
                self._answer(chunk, writer)
                chunk = []
        if chunk and not self.stop.is_set:
            self._answer(chunk, writer)
        return not self.stop.is_set

    def _call(self, row: InputRow) -> _Call:
        """What the engine runs for this row: its inputs and options."""
        if row.url is None:
            inputs = [tuple(row.texts)] if self.task == "score" else [row.texts[0]]
            return _Call(inputs, self.params, self.truncate, False)
        request, problem = openai_batch.pooling_request(row.url, row.body)
        assert problem is None, problem        # rows.validate_record checked the same body
        params = type(self.params)(dimensions=request.dimensions,
                                   normalize=request.normalize,
                                   activation=request.activation)
        truncate = request.truncate_prompt_tokens
        inputs = [list(x) if isinstance(x, tuple) and self.task == "embed" else x
                  for x in request.inputs]
        return _Call(inputs, params, self.truncate if truncate is None else truncate, True)

    def _answer(self, chunk: list[tuple[InputRow, _Call]], writer: PartWriter) -> None:
        """One chunk: rows grouped by options, one engine call per group, results written
        in row order."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, call) in enumerate(chunk):
            groups.setdefault((call.params, call.truncate), []).append(i)
        answers: list[PoolingRecord | BadRow | None] = [None] * len(chunk)
        for positions in groups.values():
            part = [chunk[i] for i in positions]
            for i, answer in zip(positions, self._run(part)):
                answers[i] = answer
        num_results = 0
        for (row, _), answer in zip(chunk, answers):
            if isinstance(answer, BadRow):
                self._bad(answer, writer)
            else:
                writer.add_result(row, answer)
                num_results += 1
        self.progress.add_rows(num_results)
        if writer.should_commit():
            writer.commit()
        self.progress.tick()
        if self.options.step_delay_s:
            time.sleep(self.options.step_delay_s)

    def _run(self, part: list[tuple[InputRow, _Call]]) -> list[PoolingRecord | BadRow]:
        """One engine call for rows with the same options; if the engine refuses it, each
        row alone, so only the rows it refuses become bad rows."""
        try:
            return self._engine_call([call for _, call in part])
        except ValueError as exc:
            if len(part) > 1:
                return [answer for item in part for answer in self._run([item])]
            row, call = part[0]
            return [BadRow(row.index, row.file, row.id, "engine_rejected", str(exc),
                           excerpt(call.inputs))]

    def _engine_call(self, calls: list[_Call]) -> list[PoolingRecord]:
        """The engine's task method over every input of ``calls``, split back per row."""
        engine, params, truncate = self.engine, calls[0].params, calls[0].truncate
        inputs = [x for call in calls for x in call.inputs]
        if self.task == "embed":
            outs = engine.embed(inputs, params, truncate)
            values = [o.outputs.embedding for o in outs]
        elif self.task == "classify":
            outs = engine.classify(inputs, params, truncate)
            values = [o.outputs.probs for o in outs]
        elif self.task == "score":
            outs = engine.score([a for a, _ in inputs], [b for _, b in inputs], params, truncate)
            values = [float(o.outputs.score) for o in outs]
        else:
            outs = engine.reward(inputs, params, truncate)
            values = [o.outputs.data.tolist() for o in outs]
        records, start = [], 0
        for call in calls:
            end = start + len(call.inputs)
            num_tokens = sum(len(o.prompt_token_ids) for o in outs[start:end])
            value = values[start:end] if call.is_openai else values[start]
            records.append(PoolingRecord(value, num_tokens))
            start = end
        return records

    def _checked(self, row: InputRow, call: _Call) -> InputRow | BadRow:
        """The row, or the BadRow the engine's checks (length, vocabulary) make of it."""
        engine = self.engine
        try:
            for i, item in enumerate(call.inputs):
                if self.task == "score" and hasattr(engine.model, "compute_scores"):
                    engine.tokenize_pair(item[0], item[1], row.index, call.truncate)
                else:
                    for text in (item if self.task == "score" else (item,)):
                        engine.tokenize(text, row.index, call.truncate)
        except ValueError as exc:
            too_long = "max_model_len" in str(exc)
            where = f"input {i} of the request: " if call.is_openai else ""
            reason = (f"{where}{exc} (in a job file: set resilience.on_long_prompt: truncate, or "
                      "raise model.max_model_len)" if too_long else f"{where}{exc}")
            return BadRow(row.index, row.file, row.id,
                          "prompt_too_long" if too_long else "engine_rejected", reason,
                          excerpt(row.body if call.is_openai else list(row.texts)))
        return row
