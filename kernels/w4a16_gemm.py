"""W4A16 GEMM: 16-bit activations times 4-bit weights dequantized inside the GEMM.

Reference: :func:`hpcinfer.kernels.quant_reference.w4a16_gemm` (layouts there). Each program
computes a [BLOCK_M, BLOCK_N] tile of out = a @ W over one slice of K; per K step it loads a
packed [BLOCK_K/8, BLOCK_N] slice of int32 words once, unpacks the nibbles and subtracts the
group's zero. When the step lies in one group (no g_idx: BLOCK_K divides the group size) the
integers q - zero go straight into tl.dot and the group's scale multiplies the [BLOCK_M,
BLOCK_N] product (one multiply per output instead of one per weight); with g_idx (GPTQ
desc_act: any input may belong to any group) each weight is (q - zero) * scale before the dot.
fp32 accumulation throughout.

Decode-sized M (1-64 rows) leaves few [BLOCK_M, BLOCK_N] tiles (N/128 for one row: 32 at
N=4096, fewer programs than an H200 has SMs), so the weight stream, which is all the work
there, would use a fraction of the memory bandwidth. Split-K gives each tile SPLIT_K programs
over disjoint K ranges, each writing fp32 partial sums to a [SPLIT_K, M, N] workspace that one
small Triton kernel sums in split order and casts (deterministic, no atomics). ``config_for``
is the table by M (tile shape, warps; from the H200 sweep) and picks SPLIT_K for the grid.

From DEQUANT_MIN_M rows on, ``w4a16_linear`` (the layers' entry) dequantizes the weight to
16 bits with ``w4a16_dequantize`` and lets cuBLAS multiply: there the GEMM is compute-bound
and unpacking inside the tensor-core loop costs more than reading 16-bit weights once.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_checks import (KernelArgumentError, check_contiguous, check_dim, check_dtype,
                            check_same_device)

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_SMS = 132          # an H100/H200; the CPU interpreter uses it to pick SPLIT_K too
MIN_STEPS_PER_SPLIT = 4    # K steps each split keeps (fewer: the partial sums cost more)


@triton.jit
def _w4a16_gemm_kernel(A, QW, Z, S, G_IDX, OUT, M, N, K, K_PER_SPLIT, stride_am, stride_om,
                       GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                       ONE_GROUP_PER_STEP: tl.constexpr, SPLIT_K: tl.constexpr,
                       UNPACK_RESHAPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    shifts = ((offs_k % 8) * 4)[:, None]                  # nibble of each k in its word
    offs_w = tl.arange(0, BLOCK_K // 8)                   # UNPACK_RESHAPE: words of a step
    shifts8 = (tl.arange(0, 8) * 4)[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT                         # a multiple of BLOCK_K
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
                    mask=mask_m[:, None], other=0.0)
        if UNPACK_RESHAPE:
            # [BLOCK_K/8, BLOCK_N] words loaded once, unpacked to [BLOCK_K/8, 8, BLOCK_N] and
            # reshaped in k order (k = 8 * word + nibble)
            words = tl.load(QW + (k0 // 8 + offs_w)[:, None].to(tl.int64) * N
                            + offs_n[None, :], mask=mask_n[None, :], other=0)
            codes = tl.reshape((words[:, None, :] >> shifts8) & 0xF, (BLOCK_K, BLOCK_N))
        else:
            # [BLOCK_K, BLOCK_N]: each word is loaded for its 8 k rows (cached after the first)
            words = tl.load(QW + (k // 8)[:, None].to(tl.int64) * N + offs_n[None, :],
                            mask=mask_n[None, :], other=0)
            codes = (words >> shifts) & 0xF
        if ONE_GROUP_PER_STEP:
            # The step lies in one group: one row of zeros and scales, and the scale is a
            # per-column factor of the whole step, so it multiplies the [BLOCK_M, BLOCK_N]
            # product once instead of every one of the [BLOCK_K, BLOCK_N] weights: the dot
            # takes the integers q - zero (-15..15, exact in fp16/bf16) straight from int32.
            gn = (k0 // GROUP_SIZE) * N + offs_n.to(tl.int64)
            zeros = tl.load(Z + gn, mask=mask_n, other=0)
            scales = tl.load(S + gn, mask=mask_n, other=0.0)
            w = (codes - zeros[None, :]).to(tl.float32).to(A.dtype.element_ty)
            acc += tl.dot(a, w) * scales[None, :]
        else:
            if HAS_G_IDX:
                g = tl.load(G_IDX + k)
            else:
                g = k // GROUP_SIZE
            gn = g[:, None].to(tl.int64) * N + offs_n[None, :]
            zeros = tl.load(Z + gn, mask=mask_n[None, :], other=0)
            scales = tl.load(S + gn, mask=mask_n[None, :], other=0.0)
            w = ((codes - zeros).to(tl.float32) * scales).to(A.dtype.element_ty)
            acc += tl.dot(a, w)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        out = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)
    else:                        # fp32 partial sums: workspace [SPLIT_K, M, N]
        out = (OUT + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
               + offs_n[None, :])
        tl.store(out, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(PART, OUT, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # out = sum over the SPLIT_K fp32 partials [SPLIT_K, M*N] in split order, cast once: one
    # launch instead of torch's sum and copy, deterministic (no atomics)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(PART + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(PART + s * MN + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _w4a16_dequant_kernel(QW, Z, S, G_IDX, W, N, LD, GROUP_SIZE: tl.constexpr,
                          HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # W[k, n] = (q - zero) * scale in W's dtype for one [BLOCK_K, BLOCK_N] tile of a slice of
    # N columns: QW/Z/S point at the slice's first column and have row stride LD (the full
    # width); W is the slice, contiguous [K, N]
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    words = tl.load(QW + (pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8))[:, None]
                    .to(tl.int64) * LD + offs_n[None, :], mask=mask_n[None, :], other=0)
    shifts8 = (tl.arange(0, 8) * 4)[None, :, None]
    codes = tl.reshape((words[:, None, :] >> shifts8) & 0xF, (BLOCK_K, BLOCK_N))
    if HAS_G_IDX:
        g = tl.load(G_IDX + k)
    else:
        g = k // GROUP_SIZE
    gn = g[:, None].to(tl.int64) * LD + offs_n[None, :]
    zeros = tl.load(Z + gn, mask=mask_n[None, :], other=0)
    scales = tl.load(S + gn, mask=mask_n[None, :], other=0.0)
    w = ((codes - zeros).to(tl.float32) * scales).to(W.dtype.element_ty)
    tl.store(W + k[:, None].to(tl.int64) * N + offs_n[None, :], w, mask=mask_n[None, :])


class W4A16Config(NamedTuple):
    """One launch: tile [block_m, block_n], K step block_k, warps, K split in split_k, and
    how the packed words are read: each word once then unpacked to [BLOCK_K/8, 8, BLOCK_N]
    and reshaped (unpack_reshape, the default since the H200 sweep), or once per k row from
    cache."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1
    unpack_reshape: bool = True


# By M (the rows of a: tokens in the step). The first row whose bound is >= M applies;
# split_k 0 means "pick by the grid" (config_for, with the waves below).
# From the H200 sweep bench/results/kernels-w4a16-sweep-nvidia-h200-2026-12-03.json (816
# rows: 8B qkv, 8B down, 70B gate_up, 70B down x M 1/16/64/256 x tile x split-K x read):
# - M 1 and 16: [16, 128] tiles, block_k 128, 4 warps won or were within 4% of the best on
#   all four shapes (e.g. 70B down M=1 0.109 ms vs 0.166 for the old [16, 64] default, 8B down
#   M=1 0.038 vs 0.092);
# - M 64: [64, 128] x 64, 4 warps, split 8 on qkv/down (70B down 0.132 vs 0.301 ms);
# - M 256: [128, 128] x 64, 8 warps (70B down 0.373 ms with split 2, 8B qkv 0.067 split 1);
# - unpack_reshape=True won in every one of the 16 (shape, M) cells, by 1.2-2x.
# Split-K: the sweep's best split gave about 4 waves of SMs' worth of programs at M <= 64
# (8B down M=1: 32 tiles x 8; 70B gate_up: 448 tiles x 2) and about 2 at M=256; the rule in
# config_for with SPLIT_WAVES below picks within 7% of the best in 15 of the 16 cells (8B qkv
# M=1 picks split 8, measured 0.037 vs 0.026 ms at split 4: a noisy cell, split 8 was best
# with [16, 64] tiles).
CONFIG_TABLE: tuple[tuple[int, W4A16Config], ...] = (
    (16, W4A16Config(16, 128, 128, 4, 0)),
    (32, W4A16Config(32, 128, 64, 4, 0)),
    (64, W4A16Config(64, 128, 64, 4, 0)),
    (128, W4A16Config(64, 128, 64, 4, 0)),
    (1 << 62, W4A16Config(128, 128, 64, 8, 0)),
)
# programs to aim for, in waves of SMs, by M (first bound >= M); split_k stops doubling there
SPLIT_WAVES: tuple[tuple[int, int], ...] = ((64, 4), (1 << 62, 2))
MAX_SPLIT_K = 8            # the sweep tried 1/2/4/8
# M from which the layer dequantizes the weight to a 16-bit [K, N] (Triton, chunked over N)
# and multiplies with cuBLAS instead of this kernel: at M=256 the best kernel launch is still
# 2.4x the bf16 GEMM on 8B qkv (0.067 vs 0.028 ms), where a dequantize pass (read 4-bit,
# write 16-bit: ~60 MB, ~15-20 us at ~3-4 TB/s) plus the bf16 GEMM should take ~0.045 ms;
# at M=2048 the kernel is 3.3x bf16 everywhere. An estimate, not yet measured: see
# docs/quantization.md. vLLM's AWQ layer switches at 256 tokens too.
DEQUANT_MIN_M = 256
DEQUANT_CHUNK_BYTES = 256 << 20   # the 16-bit weight slice dequantized at a time


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(m: int, n: int, k: int, group_size: int, has_g_idx: bool,
               sms: int = DEFAULT_SMS) -> W4A16Config:
    """The launch for an [m, k] x [k, n] product: the table's tiles for m, the K step cut to
    divide K and (without g_idx) to stay inside one group, and split_k doubled (up to
    MAX_SPLIT_K) while the grid is under SPLIT_WAVES waves of ``sms`` programs and each split
    keeps MIN_STEPS_PER_SPLIT K steps."""
    cfg = next(c for bound, c in CONFIG_TABLE if m <= bound)
    block_k = cfg.block_k if k % cfg.block_k == 0 else 64
    if not has_g_idx and group_size % 32 == 0 and k % group_size == 0:
        block_k = min(block_k, group_size)   # then each K step reads one group's row
    split = cfg.split_k
    if split == 0:
        waves = next(w for bound, w in SPLIT_WAVES if m <= bound)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        steps, split = k // block_k, 1
        while (tiles * split < waves * sms and split < MAX_SPLIT_K
               and steps // (split * 2) >= MIN_STEPS_PER_SPLIT):
            split *= 2
    return cfg._replace(block_k=block_k, split_k=split)


def _check_w4a16(a, qweight, zeros, scales, g_idx, group_size) -> None:
    check_dim("a", a, 2, "[M, K]")
    check_dim("qweight", qweight, 2, "[K / 8, N] int32")
    check_dtype("a", a, ACT_DTYPES)
    check_dtype("qweight", qweight, (torch.int32,))
    check_dtype("zeros", zeros, (torch.int32,))
    check_dtype("scales", scales, (torch.float32,))
    m, k = a.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise KernelArgumentError(f"qweight {tuple(qweight.shape)} packs {qweight.shape[0] * 8} "
                                  f"input features, a has {k}")
    if k % 128 and k % 64:
        raise KernelArgumentError(f"K={k} must be a multiple of 64 (the kernel's K step)")
    if zeros.shape != scales.shape or zeros.shape[1] != n:
        raise KernelArgumentError(f"zeros {tuple(zeros.shape)} and scales "
                                  f"{tuple(scales.shape)} must both be [groups, N={n}]")
    if g_idx is not None:
        check_dtype("g_idx", g_idx, (torch.int32,))
        if tuple(g_idx.shape) != (k,):
            raise KernelArgumentError(f"g_idx must be [K={k}], got {tuple(g_idx.shape)}")
    elif k % group_size:
        raise KernelArgumentError(f"K={k} is not a multiple of group_size={group_size}")
    if a.stride(1) != 1:
        raise KernelArgumentError(f"a must have stride 1 in K, got strides {a.stride()}")
    for name, t in (("qweight", qweight), ("zeros", zeros), ("scales", scales)):
        check_contiguous(name, t)
    check_same_device(a=a, qweight=qweight, zeros=zeros, scales=scales)


def w4a16_gemm(a: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, g_idx: torch.Tensor | None = None,
               group_size: int = 128, config: W4A16Config | None = None) -> torch.Tensor:
    """a [M, K] @ W [K, N] -> [M, N] in a's dtype; W in the layout of
    hpcinfer.kernels.quant_reference (qweight [K/8, N] int32, zeros [G, N] int32, scales
    [G, N] fp32, g_idx [K] int32 or None). ``config``: a launch other than config_for's
    (tests, bench/kernel_bench.py's sweep); its block_k must divide K (and stay in one group
    without g_idx when it is not a divisor of group_size: then groups are looked up per k)."""
    _check_w4a16(a, qweight, zeros, scales, g_idx, group_size)
    m, k = a.shape
    n = qweight.shape[1]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    cfg = config or config_for(m, n, k, group_size, g_idx is not None, num_sms(a.device))
    if k % cfg.block_k or cfg.split_k < 1:
        raise KernelArgumentError(f"config {cfg}: block_k must divide K={k} and split_k >= 1")
    steps = k // cfg.block_k
    k_per_split = triton.cdiv(steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)          # no empty split
    one_group = g_idx is None and group_size % cfg.block_k == 0
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32,
                                                device=a.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _w4a16_gemm_kernel[grid](
        a, qweight, zeros, scales, g_idx if g_idx is not None else zeros, target, m, n, k,
        k_per_split, a.stride(0), out.stride(0), GROUP_SIZE=group_size,
        HAS_G_IDX=g_idx is not None, ONE_GROUP_PER_STEP=one_group, SPLIT_K=split,
        UNPACK_RESHAPE=bool(cfg.unpack_reshape),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT_K=split,
                                                          BLOCK=block)
    return out


def w4a16_dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor | None, group_size: int, dtype: torch.dtype,
                     col_start: int = 0, col_end: int | None = None) -> torch.Tensor:
    """Columns [col_start, col_end) of the dequantized weight: [K, cols] in ``dtype``, each
    element (q - zero) * scale computed in fp32 and rounded once (as the reference's
    w4a16_weight(...).to(dtype)). Layout as w4a16_gemm's; K a multiple of 64."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    col_end = n if col_end is None else col_end
    cols = col_end - col_start
    w = torch.empty(k, cols, dtype=dtype, device=qweight.device)
    block_k, block_n = 64, 128
    grid = (k // block_k, triton.cdiv(cols, block_n))
    _w4a16_dequant_kernel[grid](
        qweight[:, col_start:], zeros[:, col_start:], scales[:, col_start:],
        g_idx if g_idx is not None else zeros, w, cols, n, GROUP_SIZE=group_size,
        HAS_G_IDX=g_idx is not None, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return w


def w4a16_linear(a: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                 scales: torch.Tensor, g_idx: torch.Tensor | None = None,
                 group_size: int = 128) -> torch.Tensor:
    """a [M, K] @ W -> [M, N] as the W4A16 layers run it, the one place that picks the path
    by M: below DEQUANT_MIN_M rows the dequantize-in-the-GEMM kernel (w4a16_gemm: decode is
    memory-bound, the 4-bit weight stream is the work); from DEQUANT_MIN_M on (prefill
    chunks, large decode batches: compute-bound, where the kernel's per-element unpacking
    costs more than it saves) the weight is dequantized to a's dtype in slices of at most
    DEQUANT_CHUNK_BYTES and each slice multiplied by cuBLAS."""
    _check_w4a16(a, qweight, zeros, scales, g_idx, group_size)
    m, k = a.shape
    n = qweight.shape[1]
    if m < DEQUANT_MIN_M or a.dtype == torch.float32:
        return w4a16_gemm(a, qweight, zeros, scales, g_idx, group_size)
    cols = max(128, DEQUANT_CHUNK_BYTES // (k * a.element_size()) // 128 * 128)
    if cols >= n:
        return a @ w4a16_dequantize(qweight, zeros, scales, g_idx, group_size, a.dtype)
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    for start in range(0, n, cols):
        end = min(n, start + cols)
        out[:, start:end] = a @ w4a16_dequantize(qweight, zeros, scales, g_idx, group_size,
                                                 a.dtype, start, end)
    return out
