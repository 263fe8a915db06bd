"""Decode attention over a prefix every row shares (cascade attention, kernels/decode_attention.py)
against the torch reference, under the Triton interpreter.

The batches come from make_paged_batch with the first blocks of every row's table replaced by
row 0's, as prefix caching leaves them when all rows begin with one system prompt. The
reference reads every row's table as usual, so it checks that the shared kernel's partial
results and the decode programs' own keys merge into exactly the attention of the whole rows.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.cache import reshape_and_cache
from hpcinfer.kernels.decode_attention import SHARED_BLOCK_M, paged_decode_attention
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.random_batch import make_paged_batch

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
BLOCK = 16


def _shared_batch(seq_lens, shared_blocks, heads, kv_heads, head_dim, dtype, seed=0):
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim, block_size=BLOCK,
                         dtype=dtype, seed=seed)
    assert min(seq_lens) > shared_blocks * BLOCK, "every row needs keys of its own"
    b.block_tables[:, :shared_blocks] = b.block_tables[0, :shared_blocks]
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


def _expected(b, scale, **features):
    return reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                            b.seq_lens, scale, **features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 80), (16, 2, 64)])
def test_shared_prefix_matches_reference(dtype, heads, kv_heads, head_dim):
    # Rows right after the prefix (one own key), at and around block edges, and longer.
    lens = [33, 34, 47, 48, 49, 80]
    b = _shared_batch(lens, 2, heads, kv_heads, head_dim, dtype, seed=1)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125,
                                 shared_prefix_len=2 * BLOCK)
    torch.testing.assert_close(got, _expected(b, 0.125), **TOL[dtype])


@pytest.mark.parametrize("partition_size", [16, 32])
def test_shared_prefix_with_split_k_merges_in_the_reduce(partition_size):
    # Own keys cut into partitions: the shared part joins them in the reduce kernel.
    lens = [49, 50, 65, 96, 97]
    b = _shared_batch(lens, 3, 8, 2, 64, torch.float32, seed=2)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                                 shared_prefix_len=3 * BLOCK, partition_size=partition_size)
    torch.testing.assert_close(got, _expected(b, 0.1), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_prefix_rows_span_several_programs(dtype):
    # More (sequence, query head) rows than one program holds (fp32 64, 16-bit SHARED_BLOCK_M),
    # and not a multiple of it.
    num_seqs = SHARED_BLOCK_M // 4 + 5
    lens = [17 + (5 * i) % 23 for i in range(num_seqs)]
    b = _shared_batch(lens, 1, 8, 2, 64, dtype, seed=3)
    assert num_seqs * 4 > SHARED_BLOCK_M
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                                 shared_prefix_len=BLOCK)
    torch.testing.assert_close(got, _expected(b, 0.1), **TOL[dtype])


@pytest.mark.parametrize("partition_size", [None, 16])
def test_shared_prefix_with_softcap_and_sinks(partition_size):
    # Gemma 2's cap inside the shared keys too; gpt-oss's sinks once, after the merge.
    lens = [40, 33, 70]
    b = _shared_batch(lens, 2, 8, 2, 64, torch.float32, seed=4)
    sinks = torch.randn(8)
    features = dict(logit_softcap=5.0, sinks=sinks)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.2,
                                 shared_prefix_len=2 * BLOCK, partition_size=partition_size,
                                 **features)
    torch.testing.assert_close(got, _expected(b, 0.2, **features), **TOL[torch.float32])


def test_shared_prefix_equals_the_plain_kernel():
    # The same batch without the hint: the same attention (the hint changes the work only).
    b = _shared_batch([65, 66, 90], 4, 8, 2, 64, torch.float32, seed=5)
    plain = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1)
    shared = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                                    shared_prefix_len=4 * BLOCK)
    torch.testing.assert_close(shared, plain, **TOL[torch.float32])


def test_bad_shared_prefix_lengths_are_refused():
    b = _shared_batch([40, 50], 2, 8, 2, 64, torch.float32, seed=6)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1)
    with pytest.raises(KernelArgumentError, match="multiple of the block size"):
        paged_decode_attention(*args, shared_prefix_len=20)
    with pytest.raises(KernelArgumentError, match="below max_seqlen_k"):
        paged_decode_attention(*args, shared_prefix_len=64, max_seqlen_k=64)
    with pytest.raises(KernelArgumentError, match="sliding window"):
        paged_decode_attention(*args, shared_prefix_len=16, sliding_window=8)


@pytest.mark.parametrize("tiles", ["16,16,4,2", "32,64,4,3", "128,32,8,2"])
def test_shared_prefix_tiles_from_the_environment(monkeypatch, tiles):
    # HPCINFER_SHARED_PREFIX_TILES (to measure alternatives in a whole run): rows split over
    # more or fewer programs and keys over other tiles give the same attention.
    monkeypatch.setenv("HPCINFER_SHARED_PREFIX_TILES", tiles)
    num_seqs = 11
    lens = [70 + (7 * i) % 29 for i in range(num_seqs)]
    b = _shared_batch(lens, 4, 8, 2, 64, torch.float32, seed=8)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                                 shared_prefix_len=4 * BLOCK)
    torch.testing.assert_close(got, _expected(b, 0.1), **TOL[torch.float32])


@pytest.mark.parametrize("tiles", ["64,64,4", "64,8,4,3", "48,64,4,3", "a,b,c,d", "64,64,3,3"])
def test_bad_shared_prefix_tiles_are_refused(monkeypatch, tiles):
    monkeypatch.setenv("HPCINFER_SHARED_PREFIX_TILES", tiles)
    b = _shared_batch([40, 50], 2, 8, 2, 64, torch.float32, seed=9)
    with pytest.raises(KernelArgumentError, match="HPCINFER_SHARED_PREFIX_TILES.*unset it"):
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                               shared_prefix_len=2 * BLOCK)
