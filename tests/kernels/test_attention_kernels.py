"""Paged decode and varlen prefill attention (Triton, interpreted) against kernels/reference.py.

Sizes are tiny (the interpreter costs per program) but cover what breaks kernels: odd lengths,
lengths at and around block boundaries, GQA ratios 1/4/8, a non-power-of-2 head dim,
split-K that really splits, queries that start mid-sequence, and sliding windows. Unused
cache slots are NaN (see random_batch), so reading a key that should be masked fails.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.cache import reshape_and_cache
from hpcinfer.kernels.decode_attention import (choose_partition_size, count_partitions,
                                               paged_decode_attention)
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.prefill_attention import paged_attention
from hpcinfer.kernels.random_batch import make_paged_batch

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
BLOCK = 16
# seq_len = k * block_size and +-1, odd lengths, a single token.
DECODE_LENS = [1, 15, 16, 17, 31, 32, 33, 47]
GQA = [(4, 4), (8, 2), (16, 2)]   # ratios 1, 4, 8


def _batch(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed=0):
    b = make_paged_batch(seq_lens, q_lens, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, block_size=BLOCK, dtype=dtype, seed=seed)
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_decode_matches_reference(dtype, heads, kv_heads, head_dim):
    b = _batch(DECODE_LENS, [1] * len(DECODE_LENS), heads, kv_heads, head_dim, dtype)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.125)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125)
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sliding_window", [None, 6, 20])
def test_decode_split_k_matches_reference(dtype, sliding_window):
    # partition_size 16 over up to 47 keys (table capacity 48): 3 partitions, some partitions
    # empty for short sequences, some outside the window.
    b = _batch(DECODE_LENS, [1] * len(DECODE_LENS), 8, 2, 96, dtype, seed=1)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.1, sliding_window=sliding_window)
    capacity = b.block_tables.shape[1] * BLOCK                  # the default grid bound
    for partition_size in (16, 32):
        assert count_partitions(capacity, partition_size) > 1
        got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens,
                                     0.1, sliding_window=sliding_window,
                                     partition_size=partition_size)
        torch.testing.assert_close(got, expected, **TOL[dtype])


def test_default_partitions_stay_few_for_huge_block_tables():
    # A CUDA-graph block table sized for a 128k context must not make the reduce tile huge.
    assert count_partitions(512) == 1 and count_partitions(1024) == 2
    assert count_partitions(131072) <= 64
    assert choose_partition_size(131072) == 2048 and choose_partition_size(100, 16) == 16


def test_decode_fixed_grid_out_buffer_and_empty_rows():
    # CUDA-graph use: a preallocated out, a grid fixed by an upper bound larger than any
    # sequence, and a padding row of length 0 that must come out as zeros, not NaN.
    b = _batch([0, 5, 33], [0, 1, 1], 8, 2, 64, torch.float32, seed=2)
    q = torch.randn(3, 8, 64)
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention(q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125,
                                 out=out, max_seqlen_k=256, partition_size=32)
    assert got is out
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = reference.paged_decode_attention(q[1:], b.k_cache, b.v_cache, b.block_tables[1:],
                                                b.seq_lens[1:], 0.125)
    torch.testing.assert_close(out[1:], expected, **TOL[torch.float32])


# (seq_lens, q_lens): whole prompts, prompts after a prefix-cache hit / earlier chunk (queries
# start mid-sequence, also mid-block), decodes mixed in, block-boundary lengths.
PREFILL_CASES = {
    "whole_prompts": ([7, 16, 33], [7, 16, 33]),
    "mid_sequence": ([40, 17, 48], [9, 16, 1]),
    "chunk_at_block_edge": ([32, 49, 20], [16, 17, 19]),
    # context > 2 key tiles: the kernel's unmasked fast path runs before the diagonal.
    "long_prefix": ([150, 90, 129], [20, 5, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", GQA)
@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
def test_prefill_matches_reference(dtype, heads, kv_heads, case, prefill_pack):
    seq_lens, q_lens = PREFILL_CASES[case]
    b = _batch(seq_lens, q_lens, heads, kv_heads, 80 if heads == 8 else 64, dtype, seed=3)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.2)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                          0.2, max_seqlen_q=b.max_seqlen_q)
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,sliding_window", [(True, 5), (True, 16), (False, None),
                                                   (False, 9)])
def test_prefill_masks_match_reference(dtype, causal, sliding_window, prefill_pack):
    seq_lens, q_lens = [40, 17, 70], [9, 17, 66]
    b = _batch(seq_lens, q_lens, 8, 2, 96, dtype, seed=4)
    kwargs = dict(causal=causal, sliding_window=sliding_window)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.15, **kwargs)
    # Default max_seqlen_q (num_tokens): extra tiles must be idle, not write anything.
    out = torch.full_like(b.q, float("nan"))
    paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                    0.15, out=out, **kwargs)
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_prefill_rejects_mismatched_arguments():
    b = _batch([5], [5], 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(b.q[:, :3], b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                        b.block_tables, 1.0)
    with pytest.raises(KernelArgumentError, match="cache is torch.float16"):
        paged_attention(b.q, b.k_cache.half(), b.v_cache.half(), b.cu_seqlens_q, b.seq_lens,
                        b.block_tables, 1.0)
    with pytest.raises(KernelArgumentError, match="cu_seqlens_q must be"):
        paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q[:1], b.seq_lens,
                        b.block_tables, 1.0)
    with pytest.raises(KernelArgumentError, match="head_dim=512"):
        q = torch.zeros(5, 4, 512)
        cache = torch.zeros(2, BLOCK, 4, 512)
        paged_decode_attention(q, cache, cache, b.block_tables.repeat(5, 1),
                               b.seq_lens.repeat(5), 1.0)
    two = _batch([5, 9], [5, 9], 4, 4, 64, torch.float32)
    with pytest.raises(KernelArgumentError, match="seq_lens must have stride 1"):
        paged_attention(two.q, two.k_cache, two.v_cache, two.cu_seqlens_q,
                        two.seq_lens.repeat_interleave(2)[::2], two.block_tables, 1.0)
    with pytest.raises(KernelArgumentError, match="stride 1 in its last dim"):
        every_other = torch.zeros(1, 4, 128)[..., ::2]          # [1, 4, 64], stride 2
        paged_decode_attention(every_other, b.k_cache, b.v_cache, b.block_tables, b.seq_lens,
                               1.0)


def test_big_grids_use_long_partitions():
    # Many (sequence, KV head) programs: one 2048-key partition instead of 512-key splits
    # (no reduce kernel for contexts up to 2048); small grids keep splitting long contexts.
    from hpcinfer.kernels.decode_attention import BIG_GRID_PROGRAMS
    assert choose_partition_size(1536, num_programs=512 * 8) == 2048
    assert count_partitions(1536, choose_partition_size(1536, num_programs=512 * 8)) == 1
    assert choose_partition_size(1536, num_programs=BIG_GRID_PROGRAMS - 1) == 512
    assert choose_partition_size(131072, num_programs=4096) == 2048
    assert choose_partition_size(1536, 16, num_programs=4096) == 16   # the caller's choice


def test_big_grid_decode_matches_reference(monkeypatch):
    # The single 2048-key partition launch (threshold lowered so the interpreter stays fast).
    from hpcinfer.kernels import decode_attention
    monkeypatch.setattr(decode_attention, "BIG_GRID_PROGRAMS", 16)
    lens = [1 + (7 * i) % 40 for i in range(8)]
    b = _batch(lens, [1] * len(lens), 8, 2, 64, torch.float32, seed=3)
    assert decode_attention.choose_partition_size(2048, num_programs=8 * 2) == 2048
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.1)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1,
                                 max_seqlen_k=2048)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_fp32_pv_switch_is_closer_to_the_reference(monkeypatch, precision):
    # kernels/paged_tiles.PV_FP32 keeps P in fp32 for P@V (off by default: it costs speed on
    # the GPU). On fp16 inputs it must still match the reference, and more closely than the
    # default path, which rounds P to fp16 first.
    from hpcinfer.kernels import paged_tiles
    b = _batch(DECODE_LENS, [1] * len(DECODE_LENS), 8, 2, 64, torch.float16, seed=5)
    expected = reference.paged_decode_attention(b.q.float(), b.k_cache.float(), b.v_cache.float(),
                                                b.block_tables, b.seq_lens, 0.125)
    default = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125)
    monkeypatch.setattr(paged_tiles, "PV_FP32", {"decode": precision, "prefill": precision})
    fp32_pv = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.125)
    torch.testing.assert_close(fp32_pv, expected.half(), **TOL[torch.float16])
    err_default = (default.float() - expected).abs().mean().item()
    err_fp32_pv = (fp32_pv.float() - expected).abs().mean().item()
    assert err_fp32_pv < err_default, (err_fp32_pv, err_default)

    sb = _batch(*PREFILL_CASES[sorted(PREFILL_CASES)[0]], 8, 2, 64, torch.float16, seed=6)
    got = paged_attention(sb.q, sb.k_cache, sb.v_cache, sb.cu_seqlens_q, sb.seq_lens,
                          sb.block_tables, 0.2, max_seqlen_q=sb.max_seqlen_q)
    want = reference.paged_attention(sb.q, sb.k_cache, sb.v_cache, sb.cu_seqlens_q, sb.seq_lens,
                                     sb.block_tables, 0.2)
    torch.testing.assert_close(got, want, **TOL[torch.float16])


def test_gqa_packed_tiles_cover_each_kv_head_once(monkeypatch):
    # The packed launch has one program column per KV head (not per query head), and a tile
    # holds BLOCK_M // group tokens; a group that does not divide BLOCK_M keeps per-head tiles.
    from hpcinfer.kernels import prefill_attention as mod
    launches = []
    real = mod._prefill_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["PACK_GQA"], kwargs["BLOCK_M"]))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(mod, "_prefill_attention_kernel", Spy())
    monkeypatch.setattr(mod, "PACK_GQA", True)
    for heads, kv_heads in ((8, 2), (6, 2)):
        b = _batch([40, 17], [40, 17], heads, kv_heads, 64, torch.float32, seed=5)
        got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                              b.block_tables, 0.2, max_seqlen_q=b.max_seqlen_q)
        expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q,
                                             b.seq_lens, b.block_tables, 0.2)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])
    (grid4, packed4, block_m4), (grid3, packed3, _) = launches
    assert packed4 and grid4 == (-(-40 // (block_m4 // 4)), 2, 2)
    assert not packed3 and grid3[1] == 6
