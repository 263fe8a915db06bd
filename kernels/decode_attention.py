"""Paged attention for decode: one query token per sequence, GQA-aware, split-K.

Reference: :func:`hpcinfer.kernels.reference.paged_decode_attention`.

Work split. One program owns (sequence, kv head, partition): it loads the query rows of all
``group = num_heads // num_kv_heads`` heads that share the kv head, so each key and value is
read from memory once per group rather than once per query head (decode is bandwidth-bound:
the KV read is the cost). Long contexts are cut into partitions of ``partition_size`` keys
that run in parallel (split-K); each writes an unnormalised partial result with its running
max and sum, and ``_decode_reduce_kernel`` combines them (log-sum-exp merge).

Spec features (``AttentionSpec``, docs/kernels.md) are constexpr switches, so a layer without
them compiles to the same code as before they existed: HAS_SOFTCAP caps each logit inside the
key loop (before masking); HAS_SINKS adds ``exp(sink)`` to the softmax denominator once, at
the end: in the main kernel without split-K, in the reduce kernel after the merge with it
(each partition's sum excludes the sink, or it would count once per partition).

Shared prefix (cascade attention). When every sequence of the batch begins with the same
cached blocks (one long system prompt before thousands of rows, with prefix caching), each
row's program would read those keys again: 1,024 rows x 1,024 shared tokens is 4 GiB of loads
per layer of an 8B model, ~4 MiB of distinct bytes. With ``shared_prefix_len`` the launcher
first runs ``_shared_prefix_kernel``, in which one program takes BLOCK_M (sequence, query
head) rows of one KV head and walks the shared keys once for all of them (a dense
[rows, keys] product, as prefill does), writing each row's unnormalised result with its
max and sum; the decode programs then start at ``shared_prefix_len`` and merge those
statistics in, as one more split-K partition (log-sum-exp merge, in the epilogue or the
reduce kernel). The caller guarantees the shared keys: ``block_tables[0, :shared_prefix_len
// block_size]`` holds them for every row, and every row is longer than them.

CUDA graphs. The grid depends only on shapes and on ``max_seqlen_k``, a host int: by default
the block table's capacity (``block_tables.shape[1] * block_size``), so a graph captured once
per batch size stays valid as sequences grow. Partitions past a sequence's end do no loads.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KV_CACHE_DTYPES, KernelArgumentError,
                            check_dim, check_dtype, check_head_dim, check_last_dim_contiguous,
                            check_out, check_same_device, check_sinks)
from .paged_tiles import (attend_key_tiles, fp16_dots, pv_precision, query_for_cache,
                          sink_denominator, softcap_args)

LOG2E = 1.4426950408889634
DEFAULT_PARTITION_SIZE = 512
# The reduce kernel holds all partitions of a head in registers ([BLOCK_P, BLOCK_D] fp32): with
# a 128k-token block table, 512-key partitions would make that 256 rows. Past this count the
# default partition size doubles instead.
MAX_DEFAULT_PARTITIONS = 64
# With this many (sequence, KV head) programs the grid fills the GPU many times over without
# split-K, and splitting short contexts only adds partial-result traffic and the reduce
# kernel. H100, a workload-B decode step (512 sequences, mean context 388, capacity 1536,
# bench/kernel_bench.py --only decode_mix): 310 us with one 2048-key partition vs 362 us with
# 512-key partitions + reduce; workload A's shape (capacity 512) is unchanged at 93 us.
BIG_GRID_PROGRAMS = 2048
BIG_GRID_PARTITION_SIZE = 2048
# Rows ((sequence, query head) pairs of one KV head) per program of the shared-prefix kernel
# for 16-bit dtypes (fp32: 64, to keep its tiles in shared memory). H200 sweep of workload P's
# decode step (bench/results/kernels-shared-sweep-nvidia-h200-2026-12-04.json, the whole
# launch): 128 rows, 64-key tiles, 8 warps 0.201 ms; the first guess (64 rows, 4 warps)
# 0.214 ms; 32 rows 0.262 ms.
SHARED_BLOCK_M = 128
# "BLOCK_M,BLOCK_N,num_warps,num_stages": the shared-prefix kernel's tiles, to measure
# alternatives in a whole run (bench/kernel_bench.py --only sweep_decode_shared times them).
SHARED_TILES_ENV = "HPCINFER_SHARED_PREFIX_TILES"


@triton.jit
def _decode_attention_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, SINKS, OUT, PART_ACC, PART_MAX, PART_SUM,
    SH_ACC, SH_MAX, SH_SUM, shared_len,
    qk_scale, sliding_window, softcap_log2,
    stride_qs, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_os, stride_oh,
    num_heads, num_partitions,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SHARED: tl.constexpr,
    FP16_DOTS: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + seq)

    # Keys this program attends to: [lo, hi) within its partition (and the window). The
    # shared prefix's keys (shared_len = 0 without one) were attended by _shared_prefix_kernel.
    lo = shared_len + part * PARTITION_SIZE
    hi = tl.minimum(lo + PARTITION_SIZE, seq_len)
    if HAS_WINDOW:
        # Query at seq_len - 1 sees keys at positions > seq_len - 1 - window.
        lo = tl.maximum(lo, seq_len - sliding_window)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    # q: [BLOCK_G, BLOCK_D], the group's heads as rows (padded rows are zero).
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    q = query_for_cache(q, FP16_DOTS)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)   # running max, log2 domain
    l_i = tl.zeros([BLOCK_G], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    # Keys up to the window's start are cut by lo, so only the length mask applies.
    acc, l_i, m_i = attend_key_tiles(
        acc, l_i, m_i, q, K_CACHE, V_CACHE, table, kv_head, offs_g, lo, hi, qk_scale,
        sliding_window, stride_cb, stride_cs, stride_ch, offs_d, mask_d, BLOCK_SIZE, BLOCK_N,
        True, False, False, DOT_PRECISION, PV_PRECISION, softcap_log2, HAS_SOFTCAP)

    row_mask = mask_g[:, None] & mask_d[None, :]
    if HAS_SHARED and not IS_SPLIT:   # split: the reduce kernel merges the shared part
        shared = seq * num_heads + heads
        acc, l_i, m_i = merge_partials(
            acc, l_i, m_i, tl.load(SH_ACC + shared[:, None] * BLOCK_D + offs_d[None, :],
                                   mask=row_mask, other=0.0),
            tl.load(SH_SUM + shared, mask=mask_g, other=0.0),
            tl.load(SH_MAX + shared, mask=mask_g, other=float("-inf")))
    if IS_SPLIT:
        # Partial results: [num_seqs, num_heads, num_partitions(, BLOCK_D)], fp32.
        row = (seq * num_heads + heads) * num_partitions + part
        tl.store(PART_MAX + row, m_i, mask=mask_g)
        tl.store(PART_SUM + row, l_i, mask=mask_g)
        tl.store(PART_ACC + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_mask)
    else:
        if HAS_SINKS:   # the sink joins the denominator here (split: in the reduce, once)
            sink = tl.load(SINKS + heads, mask=mask_g, other=0.0).to(tl.float32)
            denom = sink_denominator(l_i, m_i, sink)
        else:
            denom = tl.where(l_i == 0.0, 1.0, l_i)   # an empty sequence gives zeros
        out = acc / denom[:, None]
        tl.store(OUT + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    PART_ACC, PART_MAX, PART_SUM, SEQ_LENS, SINKS, OUT, SH_ACC, SH_MAX, SH_SUM, shared_len,
    stride_os, stride_oh, num_heads, num_partitions,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SHARED: tl.constexpr,
):
    # One program per (sequence, query head): merge its partitions' softmax statistics (and
    # the shared prefix's, which count as one more partition).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + seq)
    num_used = tl.minimum(tl.cdiv(seq_len - shared_len, PARTITION_SIZE), num_partitions)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_p = offs_p < num_used
    row = (seq * num_heads + head) * num_partitions + offs_p
    m = tl.load(PART_MAX + row, mask=mask_p, other=float("-inf"))          # [BLOCK_P]
    l = tl.load(PART_SUM + row, mask=mask_p, other=0.0)
    m_max = tl.max(m, 0)
    if HAS_SHARED:
        sh_max = tl.load(SH_MAX + seq * num_heads + head)
        m_max = tl.maximum(m_max, sh_max)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)                 # 0 for partitions with no keys (m = -inf)
    acc = tl.load(PART_ACC + row[:, None] * BLOCK_D + offs_d[None, :],
                  mask=mask_p[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    denom = tl.sum(w * l, 0)
    acc = tl.sum(acc * w[:, None], 0)           # [BLOCK_D]
    if HAS_SHARED:
        w_sh = tl.math.exp2(sh_max - m_max)
        denom += w_sh * tl.load(SH_SUM + seq * num_heads + head)
        acc += w_sh * tl.load(SH_ACC + (seq * num_heads + head) * BLOCK_D + offs_d,
                              mask=offs_d < HEAD_DIM, other=0.0)
    if HAS_SINKS:   # once per head, after the merge: every partition's sum excludes it
        denom = sink_denominator(denom, m_max, tl.load(SINKS + head).to(tl.float32))
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + seq * stride_os + head * stride_oh + offs_d,
             out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def merge_partials(acc, l_i, m_i, acc2, l2, m2):
    # Two online-softmax partial results over disjoint keys (log2 domain, rows [R]) -> one.
    m_new = tl.maximum(m_i, m2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.math.exp2(m_i - m_safe)
    b = tl.math.exp2(m2 - m_safe)
    return acc * a[:, None] + acc2 * b[:, None], l_i * a + l2 * b, m_new


@triton.jit
def _shared_prefix_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLES, SH_ACC, SH_MAX, SH_SUM,
    qk_scale, softcap_log2, shared_len,
    stride_qs, stride_qh, stride_cb, stride_cs, stride_ch,
    num_rows, num_heads,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PV_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FP16_DOTS: tl.constexpr = False,
):
    # One program: BLOCK_M rows of (sequence, query head) pairs whose heads share this KV
    # head, over the shared keys [0, shared_len) of block_tables[0]; unnormalised results.
    kv_head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = rows < num_rows                      # num_rows = num_seqs * GROUP
    seq = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + seq[:, None] * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    q = query_for_cache(q, FP16_DOTS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Every row sees every shared key: only the tail tile's length mask applies.
    acc, l_i, m_i = attend_key_tiles(
        acc, l_i, m_i, q, K_CACHE, V_CACHE, BLOCK_TABLES, kv_head, rows, 0, shared_len,
        qk_scale, 0, stride_cb, stride_cs, stride_ch, offs_d, mask_d, BLOCK_SIZE, BLOCK_N,
        True, False, False, DOT_PRECISION, PV_PRECISION, softcap_log2, HAS_SOFTCAP)
    out = seq * num_heads + heads
    tl.store(SH_MAX + out, m_i, mask=mask_r)
    tl.store(SH_SUM + out, l_i, mask=mask_r)
    tl.store(SH_ACC + out[:, None] * BLOCK_D + offs_d[None, :], acc,
             mask=mask_r[:, None] & mask_d[None, :])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           *, sliding_window: int | None = None,
                           logit_softcap: float | None = None, sinks: torch.Tensor | None = None,
                           out: torch.Tensor | None = None, max_seqlen_k: int | None = None,
                           partition_size: int | None = None,
                           shared_prefix_len: int = 0) -> torch.Tensor:
    """Decode attention: q [num_seqs, num_heads, head_dim], one query at seq_lens[i] - 1.

    Same arguments as the reference (``logit_softcap``, ``sinks`` [num_heads]), plus: ``out`` (preallocated [num_seqs, num_heads,
    head_dim] in q's dtype), ``max_seqlen_k`` (a host-side upper bound on seq_lens that fixes
    the grid; default: the block table's capacity) and ``partition_size`` (keys per split-K
    partition, a multiple of 16; default 512, doubled while the bound would need more than
    64 partitions) and ``shared_prefix_len`` (keys every row shares: the first
    ``shared_prefix_len // block_size`` blocks of ``block_tables[0]`` are every row's first
    blocks, and every row is longer; a multiple of the block size, not with a sliding window;
    see the module docstring). Never syncs with the host.
    """
    num_seqs, num_heads, head_dim = _check_args(q, k_cache, v_cache, block_tables, seq_lens)
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    check_out(out, tuple(q.shape), q.dtype, q.device)
    if sinks is not None:
        check_sinks(sinks, num_heads, q.device)
    qk_scale, softcap_log2 = softcap_args(scale, logit_softcap)
    if num_seqs == 0:
        return out
    if max_seqlen_k is None:
        max_seqlen_k = block_tables.shape[1] * block_size
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    cfg = decode_config(block_d, q.dtype)
    shared = _check_shared_prefix(shared_prefix_len, block_size, max_seqlen_k, sliding_window)
    if shared:
        sh_max = torch.empty((num_seqs, num_heads), dtype=torch.float32, device=q.device)
        sh_sum = torch.empty_like(sh_max)
        sh_acc = torch.empty((num_seqs, num_heads, block_d), dtype=torch.float32,
                             device=q.device)
        tiles = shared_prefix_config(block_d, q.dtype)
        block_m = tiles["BLOCK_M"]
        _shared_prefix_kernel[(num_kv_heads, triton.cdiv(num_seqs * group, block_m))](
            q, k_cache, v_cache, block_tables, sh_acc, sh_max, sh_sum,
            qk_scale, softcap_log2, shared,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            num_seqs * group, num_heads,
            HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=block_m,
            BLOCK_D=block_d, BLOCK_N=tiles["BLOCK_N"], DOT_PRECISION=_dot_precision(q.dtype),
            PV_PRECISION=pv_precision("decode", q.dtype),
            HAS_SOFTCAP=logit_softcap is not None, FP16_DOTS=fp16_dots(q.dtype, k_cache.dtype),
            num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        )
    else:
        sh_max = sh_sum = sh_acc = out   # unused by the kernels when HAS_SHARED is False
    # The decode programs see only the keys after the shared ones.
    own_keys = max_seqlen_k - shared
    partition_size = choose_partition_size(own_keys, partition_size,
                                           num_programs=num_seqs * num_kv_heads)
    if partition_size % 16:
        raise KernelArgumentError(f"partition_size={partition_size} must be a multiple of 16")
    block_n = min(cfg["BLOCK_N"], partition_size)
    num_partitions = count_partitions(own_keys, partition_size)
    is_split = num_partitions > 1
    if is_split:
        part_max = torch.empty((num_seqs, num_heads, num_partitions), dtype=torch.float32,
                               device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((num_seqs, num_heads, num_partitions, block_d),
                               dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out   # unused by the kernel when IS_SPLIT is False
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_partitions)](
        q, k_cache, v_cache, block_tables, seq_lens, q if sinks is None else sinks, out,
        part_acc, part_max, part_sum, sh_acc, sh_max, sh_sum, shared,
        qk_scale, sliding_window or 0, softcap_log2,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_heads, num_partitions,
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        PARTITION_SIZE=partition_size, HAS_WINDOW=sliding_window is not None,
        IS_SPLIT=is_split, DOT_PRECISION=_dot_precision(q.dtype),
        PV_PRECISION=pv_precision("decode", q.dtype),
        HAS_SOFTCAP=logit_softcap is not None, HAS_SINKS=sinks is not None,
        HAS_SHARED=shared > 0, FP16_DOTS=fp16_dots(q.dtype, k_cache.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if is_split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_acc, part_max, part_sum, seq_lens, q if sinks is None else sinks, out,
            sh_acc, sh_max, sh_sum, shared,
            out.stride(0), out.stride(1), num_heads, num_partitions,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_P=triton.next_power_of_2(num_partitions),
            PARTITION_SIZE=partition_size, HAS_SINKS=sinks is not None,
            HAS_SHARED=shared > 0, num_warps=4,
        )
    return out


def _check_shared_prefix(shared_prefix_len: int, block_size: int, max_seqlen_k: int,
                         sliding_window: int | None) -> int:
    """The shared prefix's length, checked (0: none)."""
    shared = int(shared_prefix_len)
    if shared == 0:
        return 0
    if shared < 0 or shared % block_size:
        raise KernelArgumentError(f"shared_prefix_len={shared} must be a positive multiple of "
                                  f"the block size {block_size} (whole shared blocks), or 0")
    if shared >= max_seqlen_k:
        raise KernelArgumentError(f"shared_prefix_len={shared} must be below max_seqlen_k="
                                  f"{max_seqlen_k}: every row has its own last key")
    if sliding_window is not None:
        raise KernelArgumentError("shared_prefix_len with a sliding window: rows would see "
                                  "different parts of the prefix; pass 0 for windowed layers")
    return shared


def decode_config(block_d: int, dtype: torch.dtype) -> dict:
    """Key tile and launch options (bench/kernel_bench.py --sweep compares alternatives)."""
    # H100 sweep (bench/results/kernels-nvidia-h100-80gb-hbm3-2026-11-24.json, bf16): 64-key
    # tiles at d128 (2.77 TB/s of 3.0 copy); 32-key tiles at d64 (2.43 vs 2.29 TB/s).
    cfg = dict(BLOCK_N=64 if block_d > 64 else 32, num_warps=4, num_stages=3)
    if block_d >= 256:
        cfg.update(BLOCK_N=32, num_warps=8)
    if dtype == torch.float32 or block_d >= 256:
        cfg.update(num_stages=2)   # fp32 / wide tiles: keep the pipeline in shared memory
    return cfg


def shared_prefix_config(block_d: int, dtype: torch.dtype) -> dict:
    """Tiles of ``_shared_prefix_kernel``: BLOCK_M rows per program, BLOCK_N keys per tile and
    the launch options; ``HPCINFER_SHARED_PREFIX_TILES="BLOCK_M,BLOCK_N,num_warps,num_stages"``
    replaces them (powers of two, BLOCK_M and BLOCK_N at least 16)."""
    text = os.environ.get(SHARED_TILES_ENV, "").strip()
    if text:
        return dict(_parse_shared_tiles(text))
    cfg = decode_config(block_d, dtype)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=cfg["BLOCK_N"], num_warps=4, num_stages=2)
    return dict(BLOCK_M=SHARED_BLOCK_M, BLOCK_N=cfg["BLOCK_N"], num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=8)
def _parse_shared_tiles(text: str) -> dict:
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    ok = (len(values) == 4 and all(v > 0 and v & (v - 1) == 0 for v in values[:3])
          and min(values[:2]) >= 16 and 1 <= values[3] <= 8)
    if not ok:
        raise KernelArgumentError(
            f"{SHARED_TILES_ENV}={text!r}: expected four integers BLOCK_M,BLOCK_N,num_warps,"
            f"num_stages (e.g. 64,64,4,3; powers of two, tiles at least 16, 1-8 stages); "
            f"unset it for the default")
    return dict(zip(names, values))


def choose_partition_size(max_seqlen_k: int, partition_size: int | None = None, *,
                          num_programs: int = 0) -> int:
    """Keys per split-K partition: the caller's choice, else 512 (2048 when num_programs,
    sequences x KV heads, reaches BIG_GRID_PROGRAMS) doubled until at most 64 partitions
    cover max_seqlen_k (the H100 sweep found 512..2048 about equally good for 8 sequences
    of 8k keys)."""
    if partition_size:
        return partition_size
    partition_size = (BIG_GRID_PARTITION_SIZE if num_programs >= BIG_GRID_PROGRAMS
                      else DEFAULT_PARTITION_SIZE)
    while triton.cdiv(max_seqlen_k, partition_size) > MAX_DEFAULT_PARTITIONS:
        partition_size *= 2
    return partition_size


def count_partitions(max_seqlen_k: int, partition_size: int | None = None) -> int:
    """Split-K partitions per sequence; above 1 the reduce kernel runs too."""
    return max(1, triton.cdiv(max_seqlen_k,
                              choose_partition_size(max_seqlen_k, partition_size)))


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 models are for exactness tests: keep full precision instead of Triton's tf32 default.
    return "ieee" if dtype == torch.float32 else None


def _check_args(q, k_cache, v_cache, block_tables, seq_lens) -> torch.Size:
    check_dim("q", q, 3, "[num_seqs, num_heads, head_dim]")
    check_paged_kv(q, k_cache, v_cache, block_tables)
    if seq_lens.shape != (q.shape[0],):
        raise KernelArgumentError(f"seq_lens must be [{q.shape[0]}] (one per query row in "
                                  f"decode), got {tuple(seq_lens.shape)}")
    if block_tables.shape[0] != q.shape[0]:
        raise KernelArgumentError(f"block_tables has {block_tables.shape[0]} rows for "
                                  f"{q.shape[0]} sequences")
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    check_last_dim_contiguous("seq_lens", seq_lens)
    check_same_device(q=q, seq_lens=seq_lens)
    return q.shape


def check_paged_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor) -> None:
    """Checks shared by the decode and prefill launchers."""
    check_dim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    check_dim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise KernelArgumentError(
            f"v_cache (shape {tuple(v_cache.shape)}, strides {v_cache.stride()}) must match "
            f"k_cache (shape {tuple(k_cache.shape)}, strides {k_cache.stride()})")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise KernelArgumentError(f"q has head_dim {head_dim}, the cache {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    check_head_dim(head_dim)
    check_dtype("q", q, FLOAT_DTYPES)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t, KV_CACHE_DTYPES)
        check_last_dim_contiguous(name, t)
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise KernelArgumentError(f"q is {q.dtype} but the cache is {k_cache.dtype}: allocate "
                                  "the KV cache in the model's dtype (or e4m3)")
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    check_last_dim_contiguous("block_tables", block_tables)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables)


__all__ = ["paged_decode_attention", "choose_partition_size", "count_partitions", "check_paged_kv", "LOG2E"]
