"""Torch references for the quantized GEMM kernels (w4a16_gemm.py, fp8_gemm.py).

Kernel layouts (what the layers' process_after_loading hands the launchers):

* W4A16: ``qweight`` [K/8, N] int32, nibble i of row j = input feature 8j + i (codes 0..15);
  ``zeros`` [G, N] int32 codes; ``scales`` [G, N] fp32; input feature k belongs to group
  ``g_idx[k]`` (or ``k // group_size`` without g_idx). w[k, n] = (q - zeros[g, n]) * scales[g, n].
* FP8 block: ``a`` e4m3 [M, K] with ``a_scales`` [M, K/BK] (one per token and BK inputs),
  ``b`` e4m3 [N, K] with ``b_scales`` [ceil(N/BN), K/BK]; out = sum over K blocks of
  (a_blk . b_blk) * a_scale * b_scale.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def unpack_k(qweight: torch.Tensor) -> torch.Tensor:
    """[K/8, N] int32 -> codes [K, N]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    codes = (qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF   # [K/8, 8, N]
    return codes.reshape(-1, qweight.shape[1])


def pack_k(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] (0..15) -> [K/8, N] int32, the kernel's layout."""
    k, n = codes.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    parts = codes.to(torch.int32).reshape(k // 8, 8, n) << shifts[None, :, None]
    return parts.sum(dim=1, dtype=torch.int32)   # disjoint bits: the sum is the OR


def w4a16_weight(qweight, zeros, scales, g_idx=None, group_size: int = 128) -> torch.Tensor:
    """Dequantized [K, N] fp32."""
    codes = unpack_k(qweight)
    g = (torch.arange(codes.shape[0], device=codes.device) // group_size if g_idx is None
         else g_idx.long())
    return (codes - zeros[g]).float() * scales[g].float()


def w4a16_gemm(a, qweight, zeros, scales, g_idx=None, group_size: int = 128) -> torch.Tensor:
    """a [M, K] (fp16/bf16/fp32) @ dequant -> [M, N] in a's dtype (fp32 accumulation, the
    weight rounded to a's dtype first, as the kernel does)."""
    w = w4a16_weight(qweight, zeros, scales, g_idx, group_size).to(a.dtype)
    return (a.float() @ w.float()).to(a.dtype)


def quantize_per_token_group(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scales [M, K/group] fp32): one scale per token and group."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // group, group)
    amax = blocks.abs().amax(dim=-1)
    # a true division, as the Triton kernel's div_rn: on CUDA `tensor / python_float` is a
    # multiplication by the reciprocal (one bit off at times), so the divisor is a tensor
    scales = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=1e-12)
    q = (blocks / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(m, k), scales


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scales [M, 1] fp32)."""
    q, scales = quantize_per_token_group(x, x.shape[1])
    return q, scales


def fp8_block_gemm(a, a_scales, b, b_scales, block: tuple[int, int], out_dtype) -> torch.Tensor:
    """Block-scaled e4m3 GEMM: a [M, K] x b [N, K]^T -> [M, N] in out_dtype."""
    bn, bk = block
    m, k = a.shape
    n = b.shape[0]
    a_full = a.float() * a_scales.repeat_interleave(bk, 1)[:, :k]
    b_full = b.float() * b_scales.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (a_full @ b_full.t()).to(out_dtype)
