"""W4A16 GEMM: 16-bit activations times 4-bit weights dequantized inside the GEMM.

Reference: :func:`hpcinfer.kernels.quant_reference.w4a16_gemm` (layouts there). Each program
computes a [BLOCK_M, BLOCK_N] tile of out = a @ W over one slice of K; per K step it loads a
packed [BLOCK_K/8, BLOCK_N] slice of int32 words once, unpacks the nibbles, subtracts the
group's zero, multiplies by its scale and feeds tl.dot in a's dtype with fp32 accumulation.
Groups come from g_idx (GPTQ desc_act: any input may belong to any group) or k // GROUP_SIZE.

Decode-sized M (1-64 rows) leaves few [BLOCK_M, BLOCK_N] tiles (N/64 for one row: 64 at
N=4096, fewer programs than an H200 has SMs), so the weight stream, which is all the work
there, would use a fraction of the memory bandwidth. Split-K gives each tile SPLIT_K programs
over disjoint K ranges, each writing fp32 partial sums to a [SPLIT_K, M, N] workspace that
one torch sum reduces (deterministic, no atomics). ``config_for`` is the table by M (tile
shape, warps) and picks SPLIT_K so the grid covers about one wave of SMs.
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
        if ONE_GROUP_PER_STEP:   # the step lies in one group: one row of zeros and scales
            gn = (k0 // GROUP_SIZE) * N + offs_n[None, :].to(tl.int64)
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


class W4A16Config(NamedTuple):
    """One launch: tile [block_m, block_n], K step block_k, warps, K split in split_k, and
    how the packed words are read: each word once then reshaped (unpack_reshape), or once
    per k row from cache (the default until a GPU sweep says otherwise)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    split_k: int = 1
    unpack_reshape: bool = False


# By M (the rows of a: tokens in the step): thin tiles for decode, square ones for prefill.
# The first row whose bound is >= M applies; split_k 0 means "pick by the grid" (config_for).
CONFIG_TABLE: tuple[tuple[int, W4A16Config], ...] = (
    (16, W4A16Config(16, 64, 128, 4, 0)),
    (32, W4A16Config(32, 64, 128, 4, 0)),
    (64, W4A16Config(64, 64, 64, 4, 0)),
    (128, W4A16Config(64, 128, 64, 4, 0)),
    (256, W4A16Config(128, 128, 64, 8, 0)),
    (1 << 62, W4A16Config(128, 128, 64, 8, 1)),
)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(m: int, n: int, k: int, group_size: int, has_g_idx: bool,
               sms: int = DEFAULT_SMS) -> W4A16Config:
    """The launch for an [m, k] x [k, n] product: the table's tiles for m, the K step cut to
    divide K and (without g_idx) to stay inside one group, and split_k doubled while the grid
    is under one wave of ``sms`` programs and each split keeps MIN_STEPS_PER_SPLIT K steps."""
    cfg = next(c for bound, c in CONFIG_TABLE if m <= bound)
    block_k = cfg.block_k if k % cfg.block_k == 0 else 64
    if not has_g_idx and group_size % 32 == 0 and k % group_size == 0:
        block_k = min(block_k, group_size)   # then each K step reads one group's row
    split = cfg.split_k
    if split == 0:
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        steps, split = k // block_k, 1
        while tiles * split < sms and steps // (split * 2) >= MIN_STEPS_PER_SPLIT:
            split *= 2
    return cfg._replace(block_k=block_k, split_k=split)


def w4a16_gemm(a: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, g_idx: torch.Tensor | None = None,
               group_size: int = 128, config: W4A16Config | None = None) -> torch.Tensor:
    """a [M, K] @ W [K, N] -> [M, N] in a's dtype; W in the layout of
    hpcinfer.kernels.quant_reference (qweight [K/8, N] int32, zeros [G, N] int32, scales
    [G, N] fp32, g_idx [K] int32 or None). ``config``: a launch other than config_for's
    (tests, bench/kernels.py's sweep); its block_k must divide K (and stay in one group
    without g_idx when it is not a divisor of group_size: then groups are looked up per k)."""
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
        out.copy_(target.sum(dim=0))
    return out
