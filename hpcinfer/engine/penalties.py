"""PenaltyState: each penalised sequence's prompt mask and output counts, kept on the device.

Why: presence/frequency/repetition penalties need, per row, which tokens the prompt holds
and how often each token was generated. Rebuilding both from every row's token ids at every
step meant iterating ~130k host ids a step for 256 rows of 256 + 256 tokens (workload A on an
H200: 6.9 ms a decode step, 10.8 ms with repetition_penalty=1.1, docs/performance.md). Here
a sequence's row is built from its host ids once, when it first needs one, and each later
step only adds the outputs not counted yet: normally one token a row, all rows in one copy.

Ownership: the Sampler owns one, made at the first penalised row (runs without penalties
allocate nothing). It reads sequences and the step in flight, and writes only its tensors.

A row is valid while the sequence's output ids only grow. They do: the engine appends
(token_appender.py) and pops nothing but a trailing placeholder, and preemption by recompute
keeps token_ids. Under async scheduling (inflight.py) a trailing placeholder is counted from
the step in flight (``pending.tokens``) and recorded as counted, so the real token the host
appends in its place later is not counted again: it is the same token. A placeholder is
dropped without its token only from a finished sequence (wasted row, abort), which is never
sampled again; a row whose outputs are ever fewer than those counted is rebuilt anyway.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from hpcinfer.engine.sequence import Sequence
from hpcinfer.layers.transfer import to_device

# Capacity grows in steps of this many rows, so a batch growing row by row regrows rarely.
CAPACITY_STEP = 64


@dataclass
class _Slot:
    row: int            # the sequence's row in output_counts / prompt_mask
    num_counted: int    # its leading output tokens already in output_counts


class PenaltyState:
    """Persistent ``output_counts`` [capacity, vocab] int32 and ``prompt_mask``
    [capacity, vocab] bool, one row per sequence (by ``seq_id``), updated incrementally.

    Capacity follows the most penalised rows one call has had (rounded up to CAPACITY_STEP),
    so the persistent tensors are the size of the per-step tensors the sampler allocated at
    every step before (256 rows of a 128k vocabulary: 128 MiB of counts, 32 MiB of mask).
    When no row is free, the rows of sequences not in the call are reclaimed (finished or
    waiting ones: rebuilt from the host if they come back) before capacity grows."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._slots: dict[int, _Slot] = {}   # seq_id -> its row
        self._free: list[int] = []
        self.output_counts = self._zeros(0, torch.int32)
        self.prompt_mask = self._zeros(0, torch.bool)

    @property
    def capacity(self) -> int:
        return self.output_counts.shape[0]

    def update(self, seqs: list[Sequence], pending=None) -> torch.Tensor:
        """Bring the rows of ``seqs`` up to date; their rows, [len(seqs)] int64 on the device.

        ``pending``: the step in flight (inflight.InFlight) whose tokens stand behind the
        rows' trailing placeholders. Everything goes to the device in one pinned copy."""
        for seq in seqs:   # (shorter than counted: cannot happen today, see the docstring)
            slot = self._slots.get(seq.seq_id)
            if slot is not None and slot.num_counted > seq.num_output_tokens:
                self._release(seq.seq_id)
        new = [s for s in seqs if s.seq_id not in self._slots]
        self._assign(new, keep={s.seq_id for s in seqs})
        rows = [self._slots[s.seq_id].row for s in seqs]
        prompt_rows, prompt_ids = self._prompt_pairs(new)
        out_rows, out_ids, flight_rows, flight_index = self._new_output_pairs(seqs, pending)
        host = np.concatenate([np.asarray(x, np.int64) for x in (
            rows, [self._slots[s.seq_id].row for s in new], prompt_rows, prompt_ids,
            out_rows, out_ids, flight_rows, flight_index)])
        sizes = [len(rows), len(new), len(prompt_rows), len(prompt_rows), len(out_rows),
                 len(out_rows), len(flight_rows), len(flight_rows)]
        (rows_d, new_d, prompt_rows_d, prompt_ids_d, out_rows_d, out_ids_d, flight_rows_d,
         flight_index_d) = to_device(host, self.device).split(sizes)
        if len(new):   # a reclaimed row still holds its last sequence's counts
            self.output_counts.index_fill_(0, new_d, 0)
            self.prompt_mask.index_fill_(0, new_d, False)
        if len(prompt_rows):
            self.prompt_mask[prompt_rows_d, prompt_ids_d] = True
        self._count(out_rows_d, out_ids_d)
        if len(flight_rows):
            self._count(flight_rows_d, pending.tokens[flight_index_d])
        return rows_d

    def _count(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        if rows.numel():   # accumulate: a token repeated in one update counts each time
            self.output_counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.int32),
                                          accumulate=True)

    def _prompt_pairs(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """(row, token) for every prompt token of ``seqs`` inside the vocabulary."""
        lens = [s.num_prompt_tokens for s in seqs]
        ids = np.fromiter(itertools.chain.from_iterable(
            s.token_ids[:s.num_prompt_tokens] for s in seqs), np.int64, sum(lens))
        rows = np.repeat(np.asarray([self._slots[s.seq_id].row for s in seqs], np.int64), lens)
        return self._in_vocab(rows, ids)

    def _new_output_pairs(self, seqs: list[Sequence], pending):
        """(row, token) for the outputs not counted yet that the host knows, and (row, row in
        pending.tokens) for trailing placeholders, which then count as counted."""
        tails, rows, flight_rows, flight_index = [], [], [], []
        for seq in seqs:
            slot = self._slots[seq.seq_id]
            end = seq.num_output_tokens
            if seq.has_placeholder:
                end -= 1
            if slot.num_counted < end:
                tails.append(seq.token_ids[seq.num_prompt_tokens + slot.num_counted:
                                           seq.num_prompt_tokens + end])
                rows.append(slot.row)
                slot.num_counted = end
            if seq.has_placeholder and pending is not None and slot.num_counted == end:
                flight_rows.append(slot.row)
                flight_index.append(pending.index[id(seq)])
                slot.num_counted = end + 1
        lens = [len(t) for t in tails]
        ids = np.fromiter(itertools.chain.from_iterable(tails), np.int64, sum(lens))
        out_rows, out_ids = self._in_vocab(np.repeat(np.asarray(rows, np.int64), lens), ids)
        return out_rows, out_ids, flight_rows, flight_index

    def _in_vocab(self, rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Ids past the logits (a tokenizer's added tokens) cannot be sampled: left out.
        keep = (ids >= 0) & (ids < self.vocab_size)
        return rows[keep], ids[keep]

    def _assign(self, seqs: list[Sequence], keep: set[int]) -> None:
        """A free row for each of ``seqs``: reclaimed from sequences not in ``keep`` (this
        call's), else from a larger capacity."""
        if len(self._free) < len(seqs):
            for seq_id in [i for i in self._slots if i not in keep]:
                self._release(seq_id)
        if len(self._free) < len(seqs):
            self._grow(len(self._slots) + len(seqs))
        for seq in seqs:
            self._slots[seq.seq_id] = _Slot(self._free.pop(), 0)

    def _release(self, seq_id: int) -> None:
        self._free.append(self._slots.pop(seq_id).row)

    def _grow(self, num_rows: int) -> None:
        old = self.capacity
        new = -(-num_rows // CAPACITY_STEP) * CAPACITY_STEP
        counts, mask = self._zeros(new, torch.int32), self._zeros(new, torch.bool)
        counts[:old], mask[:old] = self.output_counts, self.prompt_mask
        self.output_counts, self.prompt_mask = counts, mask
        self._free.extend(range(new - 1, old - 1, -1))   # popped lowest first

    def _zeros(self, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
        # Ordinary tensors even when made under inference mode (which would forbid the
        # in-place updates of a later call outside it).
        with torch.inference_mode(False):
            return torch.zeros(num_rows, self.vocab_size, dtype=dtype, device=self.device)
