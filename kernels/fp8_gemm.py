"""FP8 (e4m3) W8A8 GEMMs.

``fp8_block_gemm``: block-scaled GEMM (DeepSeek-V3 / HF ``fp8`` checkpoints): activations
quantized per token and BK inputs, weights per [BN, BK] block; each K step multiplies e4m3
tiles on the tensor cores and scales the fp32 partial product by the two blocks' scales.
Reference: :func:`hpcinfer.kernels.quant_reference.fp8_block_gemm` (layouts there).

``fp8_scaled_mm``: per-tensor / per-channel weight scales with per-token activation scales,
through ``torch._scaled_mm`` (cuBLASLt, rowwise scaling). Both need compute capability >= 8.9.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import KernelArgumentError, check_contiguous, check_dim, check_dtype

FP8 = torch.float8_e4m3fn
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _fp8_block_gemm_kernel(A, AS, B, BS, OUT, M, N, K, stride_as, stride_bs, stride_om,
                           BLOCK_SIZE_N: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # BLOCK_K equals the scale block along K, so one (a_scale, b_scale) pair per K step.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = B + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]      # [BLOCK_K, BLOCK_N]
    b_scale_rows = offs_n // BLOCK_SIZE_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(AS + offs_m * stride_as + kb, mask=mask_m, other=0.0)
        b_s = tl.load(BS + b_scale_rows * stride_bs + kb, mask=mask_n, other=0.0)
        if UPCAST:   # the CPU interpreter has no e4m3 dot
            part = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            part = tl.dot(a, b)
        acc += part * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor,
                   b_scales: torch.Tensor, block: tuple[int, int],
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] e4m3 (scales [M, K/BK] fp32) x b [N, K] e4m3 (scales [ceil(N/BN), K/BK])
    -> [M, N] out_dtype. K must be a multiple of BK."""
    check_dim("a", a, 2, "[M, K] e4m3")
    check_dim("b", b, 2, "[N, K] e4m3")
    check_dtype("a", a, (FP8,))
    check_dtype("b", b, (FP8,))
    check_dtype("a_scales", a_scales, (torch.float32,))
    check_dtype("b_scales", b_scales, (torch.float32,))
    if out_dtype not in OUT_DTYPES:
        raise KernelArgumentError(f"out_dtype {out_dtype} is not one of {OUT_DTYPES}")
    bn, bk = block
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or k % bk:
        raise KernelArgumentError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must share K, a "
                                  f"multiple of the scale block {bk}")
    if tuple(a_scales.shape) != (m, k // bk):
        raise KernelArgumentError(f"a_scales must be [M, K/{bk}] = {(m, k // bk)}, got "
                                  f"{tuple(a_scales.shape)}")
    if tuple(b_scales.shape) != (triton.cdiv(n, bn), k // bk):
        raise KernelArgumentError(f"b_scales must be [ceil(N/{bn}), K/{bk}] = "
                                  f"{(triton.cdiv(n, bn), k // bk)}, got {tuple(b_scales.shape)}")
    if bk < 16 or bk & (bk - 1):
        raise KernelArgumentError(f"the K scale block {bk} must be a power of two >= 16")
    for name, t in (("a", a), ("b", b)):
        check_contiguous(name, t)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    block_n = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_gemm_kernel[grid](
        a, a_scales, b, b_scales, out, m, n, k, a_scales.stride(0), b_scales.stride(0),
        out.stride(0), BLOCK_SIZE_N=bn, UPCAST=a.device.type != "cuda", BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=bk, num_warps=8 if block_m == 128 else 4)
    return out


def fp8_scaled_mm(a: torch.Tensor, a_scales: torch.Tensor, b_t: torch.Tensor,
                  b_scales: torch.Tensor, out_dtype: torch.dtype,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] e4m3 with per-token scales [M, 1] x b_t [K, N] (column-major e4m3, i.e. a
    [N, K] weight's .t()) with per-channel scales [1, N] -> [M, N] (cuBLASLt rowwise)."""
    return torch._scaled_mm(a, b_t, scale_a=a_scales, scale_b=b_scales, out_dtype=out_dtype,
                            bias=bias)
