"""Neox-style rotary embedding, applied in place to q and k.

Reference: :func:`hpcinfer.kernels.reference.rotary_embedding` (which returns new tensors;
this launcher rotates q and k where they are and returns them). One program per token
rotates all its query and key heads, reading the token's cos/sin row once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KernelArgumentError, check_dim,
                            check_dtype, check_last_dim_contiguous, check_same_device)


@triton.jit
def _rotate_heads(X, token, stride_t, stride_h, cos, sin, offs_r, mask_r,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # x[:, :HALF] and x[:, HALF:2*HALF] are the two halves that rotate into each other.
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < NUM_HEADS) & mask_r[None, :]
    ptr = X + token * stride_t + offs_h[:, None] * stride_h + offs_r[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)          # [BLOCK_H, BLOCK_R]
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    POSITIONS, Q, K, COS_SIN,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_R: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(POSITIONS + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < HALF
    cos = tl.load(COS_SIN + pos * stride_cache + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    sin = tl.load(COS_SIN + pos * stride_cache + HALF + offs_r, mask=mask_r,
                  other=0.0).to(tl.float32)
    _rotate_heads(Q, token, stride_qt, stride_qh, cos[None, :], sin[None, :], offs_r, mask_r,
                  NUM_Q_HEADS, HALF, BLOCK_QH)
    _rotate_heads(K, token, stride_kt, stride_kh, cos[None, :], sin[None, :], offs_r, mask_r,
                  NUM_K_HEADS, HALF, BLOCK_KH)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim] in place.

    cos_sin_cache: [max_position, rotary_dim] (cos half, then sin half); only the first
    rotary_dim channels of each head rotate. q and k may be strided views (slices of a fused
    qkv output) with a contiguous last dim. Returns (q, k), the same tensors.
    """
    check_dim("q", q, 3, "[num_tokens, num_heads, head_dim]")
    check_dim("k", k, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dim("cos_sin_cache", cos_sin_cache, 2, "[max_position, rotary_dim]")
    num_tokens, rotary_dim = q.shape[0], cos_sin_cache.shape[1]
    if positions.shape != (num_tokens,) or k.shape[0] != num_tokens:
        raise KernelArgumentError(f"positions {tuple(positions.shape)}, q {tuple(q.shape)} and "
                                  f"k {tuple(k.shape)} must agree on num_tokens")
    if rotary_dim % 2 or rotary_dim > q.shape[2] or rotary_dim > k.shape[2]:
        raise KernelArgumentError(f"rotary_dim={rotary_dim} must be even and <= head_dim "
                                  f"(q {q.shape[2]}, k {k.shape[2]})")
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_dim_contiguous(name, t)
    check_dtype("positions", positions, INDEX_DTYPES)
    check_last_dim_contiguous("positions", positions)
    check_same_device(positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    if num_tokens == 0:
        return q, k
    half = rotary_dim // 2
    _rotary_embedding_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=q.shape[1], NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_QH=triton.next_power_of_2(q.shape[1]), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_R=triton.next_power_of_2(half), num_warps=4,
    )
    return q, k
