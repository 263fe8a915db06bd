"""BlockManager: allocation, ref counts, chained-hash prefix caching, LRU eviction."""
from __future__ import annotations

import pytest

from hpcinfer.engine.block_manager import BlockManager
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.sequence import Sequence

BS = 4


def make_seq(tokens):
    return Sequence("r", 0, list(tokens), SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> int:
    """Allocate like the scheduler does for a new sequence; mark everything computed."""
    cached = bm.find_cached_prefix(seq)
    assert bm.allocate(seq, len(seq), cached)
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)
    return len(cached)


def test_allocate_and_free_restore_the_pool():
    bm = BlockManager(8, BS, max_num_seqs=2, max_blocks_per_seq=8)
    seq = make_seq(range(10))            # 3 blocks
    assert bm.allocate(seq, 10)
    assert seq.num_blocks == 3 and bm.num_free_blocks == 5
    assert bm.allocate(seq, 12)          # still fits in 3 blocks: no new block
    assert bm.num_free_blocks == 5
    assert bm.allocate(seq, 13) and bm.num_free_blocks == 4
    bm.check_invariants([seq])
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.kv_row == -1
    assert (bm.block_tables == 0).all()
    bm.check_invariants([])


def test_allocate_fails_without_side_effects():
    bm = BlockManager(2, BS, max_num_seqs=2, max_blocks_per_seq=4)
    seq = make_seq(range(12))
    assert not bm.allocate(seq, 12)
    assert seq.kv_row == -1 and seq.num_blocks == 0 and bm.num_free_blocks == 2
    bm.check_invariants([])


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = BlockManager(16, BS, max_num_seqs=4, max_blocks_per_seq=8)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(bm, a) == 0
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert admit(bm, b) == 2                          # two full blocks shared
    assert bm.block_ids(a)[:2] == bm.block_ids(b)[:2]
    assert bm.ref_counts[bm.block_ids(a)[0]] == 2
    # A prompt equal to a cached block-aligned prefix still computes its last token.
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert len(bm.find_cached_prefix(c)) == 1
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 9 + 10
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])


def test_chained_hash_depends_on_the_whole_prefix():
    bm = BlockManager(16, BS, max_num_seqs=4, max_blocks_per_seq=8)
    admit(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])   # same 2nd block, different parent
    assert bm.find_cached_prefix(other) == []


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(4, BS, max_num_seqs=4, max_blocks_per_seq=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])        # 3 blocks, 2 hashed
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.hash_to_block) == 2
    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert admit(bm, again) == 2                      # came back from the free queue
    bm.free(again)
    # Freed tail-first: a 1-block allocation evicts the unhashed tail, keeping both hashes;
    # the next two evict the second block before the first (LRU: head freed last).
    x = make_seq([50])
    assert bm.allocate(x, 1)
    assert len(bm.hash_to_block) == 2
    y = make_seq([60, 61, 62, 63, 64])
    assert bm.allocate(y, 5)                          # evicts the tail, then block 2 of 2
    assert len(bm.hash_to_block) == 1
    z = make_seq([1, 2, 3, 4, 5])
    assert bm.find_cached_prefix(z) == [0]            # the head block survived
    bm.check_invariants([x, y])
    bm.free(x)
    bm.free(y)
    bm.check_invariants([])


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(4, BS, max_num_seqs=4, max_blocks_per_seq=4)
    old = make_seq([1, 1, 1, 1, 0])
    new = make_seq([2, 2, 2, 2, 0])
    admit(bm, old)
    admit(bm, new)
    bm.free(old)           # freed first -> evicted first
    bm.free(new)
    filler = make_seq(range(100, 107))   # needs 2 of the 4 free blocks
    assert bm.allocate(filler, 7)
    assert bm.find_cached_prefix(make_seq([1, 1, 1, 1, 9])) == []
    assert len(bm.find_cached_prefix(make_seq([2, 2, 2, 2, 9]))) == 1


def test_cached_free_blocks_count_when_checking_capacity():
    bm = BlockManager(3, BS, max_num_seqs=2, max_blocks_per_seq=3)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    bm.free(a)
    # 2 blocks come from the cache (reclaimed from the free queue), 1 new block: fits in 3.
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2 and bm.allocate(b, 10, cached)
    # Now a sequence needing 2 fresh blocks cannot fit: 0 free.
    assert not bm.allocate(make_seq([7] * 8), 8)
    bm.check_invariants([b])


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, BS, max_num_seqs=2, max_blocks_per_seq=4, enable_prefix_caching=False)
    admit(bm, make_seq([1, 2, 3, 4, 5]))
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5])) == []
    assert not bm.hash_to_block


@pytest.mark.parametrize("seed", [0, 1])
def test_random_workload_keeps_invariants(seed):
    import random
    rng = random.Random(seed)
    bm = BlockManager(24, BS, max_num_seqs=6, max_blocks_per_seq=8)
    live = []
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    for _ in range(300):
        if live and (rng.random() < 0.4 or len(live) == 6):
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
            seq = make_seq(tokens)
            cached = bm.find_cached_prefix(seq)
            if bm.allocate(seq, len(seq), cached):
                seq.num_computed_tokens = len(seq)
                bm.cache_full_blocks(seq)
                live.append(seq)
        bm.check_invariants(live)
    assert bm.prefix_cache_hits > 0
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == 24
