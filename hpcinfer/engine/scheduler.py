"""Scheduler: continuous batching under one token budget (the only writer of queues/status).

There is no prefill or decode phase: each step, every running sequence's computed tokens
catch up to its tokens as far as the budget allows (a long prompt is prefilled in chunks),
then waiting sequences are admitted while slots, budget and KV blocks last. When a running
sequence cannot get a block, the newest running sequence is preempted by recompute: its
blocks are freed and it goes back to the front of the queue (its prefix-cached blocks
usually come straight back).

Images (hpcinfer/multimodal): a step also has an encoder budget, in image tokens (vLLM's
max_num_encoder_input_tokens; here max_num_batched_tokens). A chunk that would reach an image
the budget cannot take ends before that image; an image larger than the whole budget runs
alone in a step, so every image is encoded eventually. For models whose image tokens attend
to their whole span (Gemma 3) a chunk never ends inside a span (``_keep_spans_whole``).

Shared prompts: a waiting request whose prompt continues with blocks that a running sequence
is computing right now (admitted in this step or prefilling in chunks) waits until they are
cached, so rows sharing one long system prompt compute it once, not once per request admitted
in the same step (BlockManager.in_flight).
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from hpcinfer.engine.block_manager import BlockManager
from hpcinfer.engine.sequence import Sequence, SequenceStatus
from hpcinfer.lora.scheduling import RunningAdapters

log = logging.getLogger(__name__)

# A waiting request whose next prompt blocks another running sequence is computing waits for
# them when there are at least this many (64 tokens at block size 16): a shorter shared piece
# costs less to recompute than the step(s) of delay.
MIN_PENDING_BLOCKS = 4


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]           # in batch order
    num_new_tokens: list[int]      # query tokens per sequence this step
    num_encoder_tokens: int = 0    # image tokens the vision encoder produces this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_loras: int | None = None):
        self.block_manager = block_manager
        # LoRA: at most max_loras distinct adapters running (lora/scheduling.py)
        self.adapters = RunningAdapters(max_loras) if max_loras else None
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_encoder_tokens = max_num_batched_tokens  # image tokens encoded per step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [])
        budget = self.max_num_batched_tokens
        budget, preempted = self._schedule_running(out, budget)
        if not preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        allocate = self.block_manager.allocate
        seqs, num_new_tokens = out.seqs, out.num_new_tokens
        preempted, i = False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if seq.mm_inputs is not None:  # (text sequences pay one attribute test)
                num_new = self._keep_spans_whole(seq, seq.num_computed_tokens, num_new)
                num_new, num_encoder = self._fit_encoder_budget(seq, seq.num_computed_tokens,
                                                                num_new, out)
                out.num_encoder_tokens += num_encoder if num_new > 0 else 0
            if num_new <= 0:
                # Async scheduling: its last token, still in flight, ends it (max_tokens or
                # max_model_len), so it gets no placeholder and nothing to compute here.
                i += 1
                continue
            while not allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest sequence loses its blocks
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return budget, preempted
            seqs.append(seq)
            num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        return budget, preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm, adapters, skipped = self.block_manager, self.adapters, []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if adapters is not None and not adapters.admits(seq.lora_id):
                skipped.append(self.waiting.popleft())  # its adapter waits for a free slot
                continue
            cached = bm.find_cached_prefix(seq)
            if bm.pending_prefix_blocks(seq, len(cached)) >= MIN_PENDING_BLOCKS:
                # Another running sequence is computing the next blocks of this prompt right
                # now: wait for them to be cached (a step or a few) instead of computing the
                # same prefix again; requests behind it may still be admitted.
                skipped.append(self.waiting.popleft())
                continue
            num_cached_tokens = len(cached) * bm.block_size
            num_new, num_encoder = min(len(seq) - num_cached_tokens, budget), 0
            if seq.mm_inputs is not None:
                num_new = self._keep_spans_whole(seq, num_cached_tokens, num_new)
                num_new, num_encoder = self._fit_encoder_budget(seq, num_cached_tokens,
                                                                num_new, out)
            if num_new <= 0 or not bm.allocate(seq, num_cached_tokens + num_new, cached):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if adapters is not None:
                adapters.add(seq.lora_id)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            out.num_encoder_tokens += num_encoder
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))  # back in front, in their order

    def _keep_spans_whole(self, seq: Sequence, start: int, num_new: int) -> int:
        """Models whose image tokens attend to their whole span (Gemma 3; ``whole_spans``):
        ``num_new``, or fewer so that the chunk does not end inside a span (its first tokens
        need the keys of its last). A chunk that starts at or inside the span waits (0) for a
        step with room for the rest of it, or, when the rest exceeds even a whole step's
        budget, takes it anyway: that step goes over max_num_batched_tokens by less than one
        span, and the request is never stuck."""
        if not seq.mm_inputs.whole_spans:
            return num_new
        end = start + num_new
        for item in seq.mm_inputs.items:
            if item.offset < end < item.end:
                if item.offset > start:
                    return item.offset - start
                rest = item.end - start
                return rest if rest > self.max_num_batched_tokens else 0
        return num_new

    def _fit_encoder_budget(self, seq: Sequence, start: int, num_new: int,
                            out: SchedulerOutput) -> tuple[int, int]:
        """(query tokens, image tokens to encode): ``num_new``, or fewer so that the chunk
        stops before the first image the step's encoder budget cannot take (0 tokens: the
        sequence waits a step). The step's first image always fits, however large."""
        used = out.num_encoder_tokens
        for item in seq.mm_inputs.items_to_encode(start, start + num_new):
            if used > 0 and used + item.length > self.max_num_encoder_tokens:
                return max(item.offset - start, 0), used - out.num_encoder_tokens
            used += item.length
        return num_new, used - out.num_encoder_tokens

    def _preempt(self, seq: Sequence) -> None:
        if self.adapters is not None:
            self.adapters.remove(seq.lora_id)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.debug("preempted %r (KV pool full)", seq)

    def update_computed(self, out: SchedulerOutput) -> None:
        """After the model ran: the scheduled tokens are now in the KV cache."""
        cache_full_blocks, block_size = self.block_manager.cache_full_blocks, self.block_manager.block_size
        for seq, num_new in zip(out.seqs, out.num_new_tokens):
            if seq.is_finished:  # async: stopped by the token read back after this launch
                continue
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens // block_size > seq.num_registered_blocks:
                cache_full_blocks(seq)

    def finish(self, seqs: list[Sequence]) -> None:
        """Retire finished (or aborted) sequences, wherever they are, and free their blocks."""
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in gone]
        if any(s.status is SequenceStatus.WAITING for s in seqs):
            self.waiting = deque(s for s in self.waiting if id(s) not in gone)
        for seq in seqs:
            if self.adapters is not None and seq.status is SequenceStatus.RUNNING:
                self.adapters.remove(seq.lora_id)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
