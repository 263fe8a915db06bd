"""W4A16 GEMM: 16-bit activations times 4-bit weights dequantized inside the GEMM.

Reference: :func:`hpcinfer.kernels.quant_reference.w4a16_gemm` (layouts there). Each program
computes a [BLOCK_M, BLOCK_N] tile of out = a @ W; per K step it loads a packed [BLOCK_K/8,
BLOCK_N] slice of int32 words once, unpacks the nibbles, subtracts the group's zero, multiplies
by its scale and feeds tl.dot in a's dtype with fp32 accumulation. Groups come from g_idx
(GPTQ desc_act: any input may belong to any group) or k // GROUP_SIZE.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (KernelArgumentError, check_contiguous, check_dim, check_dtype,
                            check_same_device)

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _w4a16_gemm_kernel(A, QW, Z, S, G_IDX, OUT, M, N, K, stride_am, stride_om,
                       GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                       ONE_GROUP_PER_STEP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    shifts = ((offs_k % 8) * 4)[:, None]                  # nibble of each k in its word
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(A + offs_m[:, None].to(tl.int64) * stride_am + k[None, :],
                    mask=mask_m[:, None], other=0.0)
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
    out = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): thin tiles for decode, square for prefill."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 64, 64, 64, 4
    return 128, 128, 64, 8


def w4a16_gemm(a: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, g_idx: torch.Tensor | None = None,
               group_size: int = 128) -> torch.Tensor:
    """a [M, K] @ W [K, N] -> [M, N] in a's dtype; W in the layout of
    hpcinfer.kernels.quant_reference (qweight [K/8, N] int32, zeros [G, N] int32, scales
    [G, N] fp32, g_idx [K] int32 or None)."""
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
    block_m, block_n, block_k, warps = _tiles(m)
    if k % block_k:
        block_k = 64
    if g_idx is None and group_size % 32 == 0 and k % group_size == 0:
        block_k = min(block_k, group_size)   # then each K step reads one group's row
    one_group = g_idx is None and group_size % block_k == 0
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_gemm_kernel[grid](
        a, qweight, zeros, scales, g_idx if g_idx is not None else zeros, out, m, n, k,
        a.stride(0), out.stride(0), GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None,
        ONE_GROUP_PER_STEP=one_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out
