"""Varlen attention over paged KV: prefill chunks (and any decodes mixed in) in one launch.

Reference: :func:`hpcinfer.kernels.reference.paged_attention`.

One program owns (query tile of BLOCK_M tokens, query head, sequence), or with PACK_GQA
(query tile of BLOCK_M // group tokens, KV head, sequence), its rows the tokens' query heads
that share that KV head. Queries of sequence i
sit at absolute positions ``seq_lens[i] - q_len_i + j``: a prefix-cache hit or an earlier
chunk means they start mid-sequence, and every key (old and new) is read from the cache,
which ``reshape_and_cache`` filled first. Keys are walked in BLOCK_N tiles with an online
softmax (flash-attention style); the causal and sliding-window limits bound the walk so a
tile never loads keys that all its queries mask out. Logit softcapping (HAS_SOFTCAP, inside the
key loop, before the masks) and attention sinks (HAS_SINKS, added to the denominator after
the loop) are constexpr switches: a layer without them compiles to the code it had before.
So are per-query key limits (HAS_KEY_LIMITS: query t sees keys up to LAST_KEYS[t] instead of
its own position; Gemma 3's image tokens see their whole placeholder span): the tile's walk
then ends after the largest limit of its queries.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .decode_attention import _dot_precision, check_paged_kv
from .launch_checks import (INDEX_DTYPES, KernelArgumentError, check_dim, check_dtype,
                            check_last_dim_contiguous, check_out, check_same_device, check_sinks)
from .paged_tiles import (attend_key_tiles, fp16_dots, pv_precision, query_for_cache,
                          sink_denominator, softcap_args)


@triton.jit
def _prefill_attention_kernel(
    Q, K_CACHE, V_CACHE, CU_SEQLENS_Q, SEQ_LENS, BLOCK_TABLES, SINKS, LAST_KEYS, OUT,
    qk_scale, sliding_window, softcap_log2,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PV_PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_KEY_LIMITS: tl.constexpr, PACK_GQA: tl.constexpr, FP16_DOTS: tl.constexpr = False,
):
    tile = tl.program_id(0)
    seq = tl.program_id(2)
    q_start = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
    seq_len = tl.load(SEQ_LENS + seq)
    context = seq_len - q_len                # keys before this step's first query
    r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        # The tile's rows are (query token, query head) pairs of one KV head, token-major:
        # BLOCK_M // GROUP tokens x the GROUP heads that share the keys, so each key tile is
        # loaded once for all of them instead of once per query head.
        TOKENS = BLOCK_M // GROUP
        kv_head = tl.program_id(1)
        head = kv_head * GROUP + r % GROUP                           # [BLOCK_M]
        offs_m = tile * TOKENS + r // GROUP
    else:
        TOKENS = BLOCK_M
        head = tl.program_id(1)
        kv_head = head // GROUP
        offs_m = tile * TOKENS + r
    first_q = tile * TOKENS                  # tile's first query, index within the sequence

    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = context + offs_m                                         # [BLOCK_M] absolute
    rows = (q_start + offs_m).to(tl.int64)
    if PACK_GQA:
        head_offs = head[:, None] * stride_qh
        out_head_offs = head[:, None] * stride_oh
    else:
        head_offs = head * stride_qh
        out_head_offs = head * stride_oh
    q = tl.load(Q + rows[:, None] * stride_qt + head_offs + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)   # [BLOCK_M, BLOCK_D]
    q = query_for_cache(q, FP16_DOTS)

    q_last = q_pos                                                   # [BLOCK_M] causal limits
    if HAS_KEY_LIMITS:   # each query's last visible key (>= its own position)
        q_last = tl.load(LAST_KEYS + rows, mask=mask_m, other=0).to(tl.int32)

    # Key range any query of this tile may see: [lo, hi). Empty for tiles past q_len.
    hi = seq_len
    if IS_CAUSAL and HAS_KEY_LIMITS:
        hi = tl.minimum(hi, tl.max(tl.where(mask_m, q_last, 0), 0) + 1)
    elif IS_CAUSAL:
        hi = tl.minimum(hi, context + first_q + TOKENS)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, context + first_q - sliding_window + 1)
    hi = tl.where(first_q < q_len, hi, lo)
    hi = tl.maximum(hi, lo)
    # [lo, full_hi): whole key tiles that every query of the tile sees (keys up to the
    # tile's first query position when causal: key limits are never below a query's own
    # position); the rest is walked with masks.
    full_hi = hi
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, context + first_q + 1)
    if HAS_WINDOW:
        full_hi = lo
    full_hi = lo + (full_hi - lo) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    acc, l_i, m_i = attend_key_tiles(
        acc, l_i, m_i, q, K_CACHE, V_CACHE, table, kv_head, q_pos, lo, full_hi, qk_scale,
        sliding_window, stride_cb, stride_cs, stride_ch, offs_d, mask_d, BLOCK_SIZE, BLOCK_N,
        False, IS_CAUSAL, HAS_WINDOW, DOT_PRECISION, PV_PRECISION, softcap_log2, HAS_SOFTCAP,
        q_last, HAS_KEY_LIMITS)
    acc, l_i, m_i = attend_key_tiles(
        acc, l_i, m_i, q, K_CACHE, V_CACHE, table, kv_head, q_pos, full_hi, hi, qk_scale,
        sliding_window, stride_cb, stride_cs, stride_ch, offs_d, mask_d, BLOCK_SIZE, BLOCK_N,
        True, IS_CAUSAL, HAS_WINDOW, DOT_PRECISION, PV_PRECISION, softcap_log2, HAS_SOFTCAP,
        q_last, HAS_KEY_LIMITS)

    if HAS_SINKS:   # the head's sink joins the denominator once, after all keys
        denom = sink_denominator(l_i, m_i, tl.load(SINKS + head).to(tl.float32))
    else:
        denom = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / denom[:, None]
    tl.store(OUT + rows[:, None] * stride_ot + out_head_offs + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, *, causal: bool = True,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    sinks: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    last_key_positions: torch.Tensor | None = None,
                    max_seqlen_q: int | None = None) -> torch.Tensor:
    """Varlen attention over paged KV: q [num_tokens, num_heads, head_dim].

    Same arguments as the reference (``logit_softcap``, ``sinks`` [num_heads],
    ``last_key_positions`` [num_tokens]), plus ``out`` (preallocated, q's shape and dtype) and
    ``max_seqlen_q`` (host-side upper bound on any sequence's query count; it sizes the grid.
    Default: num_tokens, always safe but launches idle programs when there are many sequences).
    Never syncs with the host.
    """
    check_dim("q", q, 3, "[num_tokens, num_heads, head_dim]")
    check_paged_kv(q, k_cache, v_cache, block_tables)
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,):
        raise KernelArgumentError(f"cu_seqlens_q must be [num_seqs + 1] = [{num_seqs + 1}], "
                                  f"got {tuple(cu_seqlens_q.shape)}")
    if block_tables.shape[0] < num_seqs:
        raise KernelArgumentError(f"block_tables has {block_tables.shape[0]} rows for "
                                  f"{num_seqs} sequences")
    check_dtype("cu_seqlens_q", cu_seqlens_q, INDEX_DTYPES)
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    check_last_dim_contiguous("cu_seqlens_q", cu_seqlens_q)
    check_last_dim_contiguous("seq_lens", seq_lens)
    check_same_device(q=q, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    if out is None:
        out = torch.empty_like(q)
    check_out(out, tuple(q.shape), q.dtype, q.device)
    num_tokens, num_heads, head_dim = q.shape
    if sinks is not None:
        check_sinks(sinks, num_heads, q.device)
    if last_key_positions is not None:
        _check_key_limits(last_key_positions, q, causal)
    qk_scale, softcap_log2 = softcap_args(scale, logit_softcap)
    if num_tokens == 0 or num_seqs == 0:
        return out
    max_seqlen_q = min(max_seqlen_q or num_tokens, num_tokens)
    block_d = triton.next_power_of_2(head_dim)
    cfg = prefill_config(block_d, q.dtype, max_seqlen_q)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    group = num_heads // k_cache.shape[2]
    pack = bool(cfg.get("PACK_GQA")) and group > 1 and block_m % group == 0
    tokens_per_tile = block_m // group if pack else block_m
    grid = (triton.cdiv(max_seqlen_q, tokens_per_tile), num_heads // group if pack else num_heads,
            num_seqs)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables,
        q if sinks is None else sinks,
        cu_seqlens_q if last_key_positions is None else last_key_positions,   # (unread if None)
        out, qk_scale, sliding_window or 0, softcap_log2,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IS_CAUSAL=causal, HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION=_dot_precision(q.dtype), PV_PRECISION=pv_precision("prefill", q.dtype),
        HAS_SOFTCAP=logit_softcap is not None, HAS_SINKS=sinks is not None,
        HAS_KEY_LIMITS=last_key_positions is not None, PACK_GQA=pack,
        FP16_DOTS=fp16_dots(q.dtype, k_cache.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _check_key_limits(last_key_positions: torch.Tensor, q: torch.Tensor, causal: bool) -> None:
    num_tokens = q.shape[0]
    if not causal:
        raise KernelArgumentError("last_key_positions widens a causal mask: pass causal=True")
    if tuple(last_key_positions.shape) != (num_tokens,):
        raise KernelArgumentError(f"last_key_positions must be [num_tokens] = [{num_tokens}], "
                                  f"got {tuple(last_key_positions.shape)}")
    check_dtype("last_key_positions", last_key_positions, INDEX_DTYPES)
    check_last_dim_contiguous("last_key_positions", last_key_positions)
    check_same_device(q=q, last_key_positions=last_key_positions)


# PACK_GQA: a tile's rows are (token, query head) pairs of one KV head (BLOCK_M // group
# tokens x the group), so each key tile is read once for the group rather than once per query
# head. For workload P's mixed steps (~100 rows of 64 new tokens behind 1,024 cached ones),
# where the per-head tiles ran at ~75 TFLOP/s on an H200 (2026-12-04 profile: ~1.6 ms a
# layer). Off until a GPU sweep says it is faster (bench/kernel_bench.py --only
# sweep_prefill times both); HPCINFER_PREFILL_PACK_GQA=1 turns it on for a whole run.
PACK_GQA = os.environ.get("HPCINFER_PREFILL_PACK_GQA") == "1"


def prefill_config(block_d: int, dtype: torch.dtype, max_seqlen_q: int) -> dict:
    """Tile sizes and launch options (bench/kernel_bench.py --sweep compares alternatives)."""
    # H100 sweep (bench/results/kernels-nvidia-h100-80gb-hbm3-2026-11-24.json, bf16, 8 x 512
    # causal): 64x32 tiles, 4 warps: 178 TFLOP/s at d128, 145 at d64; at d256 4 warps give
    # 190 TFLOP/s where 8 gave 101.
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    if block_d >= 256:
        cfg.update(num_stages=2)
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes: keep shared-memory stages within an SM's budget.
        cfg.update(BLOCK_M=32, BLOCK_N=32, num_stages=2)
    if max_seqlen_q <= 16:
        cfg.update(BLOCK_M=16)   # decode-heavy batches: don't waste rows
    cfg["PACK_GQA"] = PACK_GQA
    return cfg
