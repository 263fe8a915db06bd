"""BlockManager: the paged KV pool's bookkeeping (the only writer of block tables and refs).

Blocks are fixed-size (``block_size`` tokens). A sequence holding blocks owns one row of
``block_tables`` ([max_num_seqs, max_blocks_per_seq] int32), which the runner reads with one
fancy-index per step instead of walking Python lists.

Prefix caching: a full block is identified by a chained hash of (parent block's hash, the
block's token ids and, where the block holds image placeholders, each image's hash and the
offset into it), so equal hashes mean equal prefixes, images included. Once computed, a
block's hash is registered; when its ref count drops to 0 it goes to the free queue
*keeping* its hash, and a later request with the same prefix takes it back. Allocating a new
block evicts the least recently freed one (the front of the queue) and forgets its hash. A
sequence's blocks are freed tail first, so shared heads outlive the tails.

Blocks in flight: a sequence admitted without a full prefix hit computes the rest of its
prompt's full blocks over the next step(s). Their hashes are counted in ``in_flight`` from
admission until they are registered (or the sequence is freed), so the scheduler can see that
a waiting request's prefix is being computed right now and let it wait for the hit instead of
computing the same blocks again (issue 22: thousands of rows sharing one system prompt).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from hpcinfer.engine.sequence import Sequence

log = logging.getLogger(__name__)

_ROOT_HASH = -1  # parent "hash" of a sequence's first block


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_blocks_per_seq: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # guards collisions
        self.hash_to_block: dict[int, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # block_tables: [max_num_seqs, max_blocks_per_seq]; row r belongs to the sequence whose
        # kv_row is r; entries past its num_blocks are 0 (the kernels' padding).
        self.block_tables = np.zeros((max_num_seqs, max_blocks_per_seq), dtype=np.int32)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        # hash -> how many running sequences are computing a block with it (not registered yet)
        self.in_flight: dict[int, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits = 0     # of those, tokens found in the cache

    # --- queries ---
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def block_ids(self, seq: Sequence) -> list[int]:
        return self.block_tables[seq.kv_row, :seq.num_blocks].tolist() if seq.kv_row >= 0 else []

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding a prefix of ``seq`` already computed; leaves >= 1 token to compute.

        Read-only: the blocks are taken (ref counted) only by ``allocate``.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = seq.max_prefix_hit_tokens // self.block_size
        self._extend_hashes(seq, max_blocks)
        blocks = []
        for i in range(max_blocks):
            block = self.hash_to_block.get(seq.block_hashes[i])
            if block is None or self.block_tokens[block] != self._block_key(seq, i):
                break
            blocks.append(block)
        return blocks

    def pending_prefix_blocks(self, seq: Sequence, num_cached_blocks: int) -> int:
        """How many blocks right after ``seq``'s cached prefix (``num_cached_blocks``, from
        find_cached_prefix, which hashed them) other running sequences are computing now."""
        if not self.in_flight:
            return 0
        hashes, in_flight = seq.block_hashes, self.in_flight
        end = min(len(hashes), seq.max_prefix_hit_tokens // self.block_size)
        num = 0
        while num_cached_blocks + num < end and hashes[num_cached_blocks + num] in in_flight:
            num += 1
        return num

    # --- writes ---
    def allocate(self, seq: Sequence, num_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make ``seq``'s blocks cover ``num_tokens`` tokens; False (changing nothing) if the
        pool is too small. ``cached_blocks`` (from find_cached_prefix) are reused first; they
        are only allowed when the sequence holds no blocks yet."""
        num_new = -(-num_tokens // self.block_size) - seq.num_blocks - len(cached_blocks)
        if num_new <= 0 and not cached_blocks:
            return True  # the decode fast path: the last block still has room
        num_reclaimed = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if num_new > self.num_free_blocks - num_reclaimed:
            return False
        if seq.kv_row < 0:
            seq.kv_row = self.free_rows.pop()
            seq.num_registered_blocks = len(cached_blocks)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += len(seq)
                self.prefix_cache_hits += len(cached_blocks) * self.block_size
                self._mark_in_flight(seq)
        row = self.block_tables[seq.kv_row]
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
            row[seq.num_blocks] = block
            seq.num_blocks += 1
        for _ in range(max(num_new, 0)):
            block = self._evict_free_block()
            self.ref_counts[block] = 1
            row[seq.num_blocks] = block
            seq.num_blocks += 1
        return True

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (tail first) and give its block-table row back."""
        if seq.kv_row < 0:
            return
        row = self.block_tables[seq.kv_row]
        for block in reversed(row[:seq.num_blocks].tolist()):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None  # most recently freed: evicted last
        self._unmark_in_flight(seq, seq.in_flight_end)
        row[:seq.num_blocks] = 0
        self.free_rows.append(seq.kv_row)
        seq.kv_row, seq.num_blocks, seq.num_registered_blocks = -1, 0, 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of ``seq``'s blocks that became full and computed this step."""
        num_full = min(seq.num_computed_tokens // self.block_size, seq.num_blocks)
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, num_full)
        self._unmark_in_flight(seq, num_full)
        row = self.block_tables[seq.kv_row]
        for i in range(seq.num_registered_blocks, num_full):
            block, block_hash = int(row[i]), seq.block_hashes[i]
            if self.block_hash[block] is None and block_hash not in self.hash_to_block:
                self.block_hash[block] = block_hash
                self.block_tokens[block] = self._block_key(seq, i)
                self.hash_to_block[block_hash] = block
        seq.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> int:
        """Unregister every cached block hash (free blocks keep their place in the queue; blocks
        in use keep their KV for their sequences, they are just no longer shared). Returns how
        many hashes were dropped."""
        num_dropped = len(self.hash_to_block)
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks
        return num_dropped

    # --- internals ---
    def _mark_in_flight(self, seq: Sequence) -> None:
        """At admission: the prompt's full blocks past the cached ones are now in flight."""
        end = seq.max_prefix_hit_tokens // self.block_size
        self._extend_hashes(seq, end)
        for i in range(seq.num_registered_blocks, end):
            self.in_flight[seq.block_hashes[i]] = self.in_flight.get(seq.block_hashes[i], 0) + 1
        seq.in_flight_end = end

    def _unmark_in_flight(self, seq: Sequence, upto: int) -> None:
        """Blocks [num_registered_blocks, upto) of ``seq`` are no longer in flight (registered,
        or freed)."""
        upto = min(upto, seq.in_flight_end)
        for i in range(seq.num_registered_blocks, upto):
            block_hash = seq.block_hashes[i]
            left = self.in_flight[block_hash] - 1
            if left:
                self.in_flight[block_hash] = left
            else:
                del self.in_flight[block_hash]
        if upto >= seq.in_flight_end:
            seq.in_flight_end = 0


    def _evict_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hash[block]
        if old_hash is not None:
            if self.hash_to_block.get(old_hash) == block:
                del self.hash_to_block[old_hash]
            self.block_hash[block] = None
            self.block_tokens[block] = None
        return block

    def _tokens_of(self, seq: Sequence, block_index: int) -> tuple[int, ...]:
        start = block_index * self.block_size
        return tuple(seq.token_ids[start:start + self.block_size])

    def _block_key(self, seq: Sequence, block_index: int) -> tuple:
        """What a block's KV depends on besides its prefix: its tokens, and the images whose
        placeholders it holds (placeholder ids are equal for every image)."""
        tokens = self._tokens_of(seq, block_index)
        if seq.mm_inputs is None:
            return tokens
        start = block_index * self.block_size
        extra = seq.mm_inputs.block_extra_keys(start, start + self.block_size)
        return (tokens, extra) if extra else tokens

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            # A LoRA adapter changes every KV entry: its id seeds the chain, so two adapters
            # (or an adapter and the base) never share a block.
            parent = hashes[-1] if hashes else (hash((_ROOT_HASH, "lora", seq.lora_id))
                                                if seq.lora_id else _ROOT_HASH)
            hashes.append(hash((parent, self._block_key(seq, len(hashes)))))

    def check_invariants(self, live_seqs: list[Sequence]) -> None:
        """Raise AssertionError unless ref counts equal the live sequences' references, free
        blocks are exactly those with no reference, and every cached hash maps back."""
        expected = [0] * self.num_blocks
        for seq in live_seqs:
            for block in self.block_ids(seq):
                expected[block] += 1
        assert expected == self.ref_counts, "ref counts differ from live block tables"
        free = {b for b, ref in enumerate(self.ref_counts) if ref == 0}
        assert free == set(self.free_queue), "free queue differs from unreferenced blocks"
        for block_hash, block in self.hash_to_block.items():
            assert self.block_hash[block] == block_hash, f"hash table entry of block {block} stale"
        in_flight: dict[int, int] = {}
        for seq in live_seqs:
            for i in range(seq.num_registered_blocks, seq.in_flight_end):
                in_flight[seq.block_hashes[i]] = in_flight.get(seq.block_hashes[i], 0) + 1
        assert in_flight == self.in_flight, "in-flight block counts differ from live sequences"
        num_rows_used = sum(1 for s in live_seqs if s.kv_row >= 0)
        assert len(self.free_rows) + num_rows_used == self.block_tables.shape[0], "row leaked"
