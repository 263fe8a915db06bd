"""Batched LoRA over rows that carry different adapters: the punica BGMV idea in Triton.

Each token row t has a slot index ``slots[t]`` into the stacked adapter weights of one
linear layer (-1: the base model only). ``lora_shrink`` computes ``x[t] @ A[slot]^T``
([T, R]) and ``lora_expand`` adds ``shrunk[t] @ B[slot]^T`` into the layer's output (a view
of it, for one piece of a merged qkv/gate_up output). One program per (row, tile), so rows
with different adapters share one launch; the indices are read on the device, never on the
host, so decode CUDA graphs can capture the launches with ``slots`` as a static buffer.
The torch reference is hpcinfer.kernels.lora_reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hpcinfer.kernels.launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KernelArgumentError,
                                            check_dim, check_dtype, check_last_dim_contiguous,
                                            check_same_device)

MAX_LORA_RANK = 256   # the rank tile is one register block


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, out_ptr, K, R,
                        stride_xt, stride_as, stride_ar, stride_ot,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    # Rows without an adapter mask every load (a bound of 0) and read from slot 0's address.
    k_bound = tl.where(slot >= 0, K, 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    # acc[r] = sum_k x[row, k] * A[slot, r, k], K in tiles
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xt + offs_k, mask=offs_k < k_bound,
                    other=0.0).to(tl.float32)
        a_mask = (offs_r[:, None] < R) & (offs_k[None, :] < k_bound)
        a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=a_mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    # rows without an adapter store zeros (their loads were masked)
    tl.store(out_ptr + row * stride_ot + offs_r, acc.to(out_ptr.dtype.element_ty),
             mask=offs_r < R)


@triton.jit
def _lora_expand_kernel(t_ptr, b_ptr, slots_ptr, y_ptr, N, R,
                        stride_tt, stride_bs, stride_bn, stride_yt,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row, tile = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    n_bound = tl.where(slot >= 0, N, 0)   # rows without an adapter: nothing loaded or stored
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    t = tl.load(t_ptr + row * stride_tt + offs_r, mask=offs_r < R,
                other=0.0).to(tl.float32)
    b_mask = (offs_n[:, None] < n_bound) & (offs_r[None, :] < R)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                mask=b_mask, other=0.0).to(tl.float32)
    delta = tl.sum(b * t[None, :], axis=1)            # [BLOCK_N]
    y_ptrs = y_ptr + row * stride_yt + offs_n
    y_mask = offs_n < n_bound
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _check_common(slots: torch.Tensor, num_rows: int, rank: int) -> None:
    check_dim("slots", slots, 1, "[num_tokens]")
    check_dtype("slots", slots, INDEX_DTYPES)
    if slots.shape[0] != num_rows:
        raise KernelArgumentError(f"slots has {slots.shape[0]} rows, the input {num_rows}: "
                                  "pass one slot index per token row")
    if not 0 < rank <= MAX_LORA_RANK:
        raise KernelArgumentError(f"LoRA rank {rank} is not supported by the kernels "
                                  f"(1..{MAX_LORA_RANK}); lower max_lora_rank")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: [T, K], lora_a: [S, R, K], slots: [T] (-1: none) -> [T, R] in x's dtype."""
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("lora_a", lora_a, 3, "[num_slots, rank, in_features]")
    for name, t in (("x", x), ("lora_a", lora_a)):
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_dim_contiguous(name, t)
    check_same_device(x=x, lora_a=lora_a, slots=slots)
    num_tokens, k = x.shape
    if lora_a.shape[2] != k:
        raise KernelArgumentError(f"lora_a has {lora_a.shape[2]} input features, x {k}")
    rank = lora_a.shape[1]
    _check_common(slots, num_tokens, rank)
    out = torch.empty((num_tokens, rank), dtype=x.dtype, device=x.device)
    if num_tokens:
        block_r = triton.next_power_of_2(rank)
        _lora_shrink_kernel[(num_tokens,)](
            x, lora_a, slots, out, k, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1),
            out.stride(0), BLOCK_R=block_r, BLOCK_K=max(16, min(128, 4096 // block_r)))
    return out


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor,
                slots: torch.Tensor) -> None:
    """y[T, N] += t[T, R] @ lora_b[slot]^T per row, in place; lora_b: [S, N, R]. ``y`` may
    be a column slice of a wider output (one piece of a merged projection)."""
    check_dim("y", y, 2, "[num_tokens, out_features]")
    check_dim("t", t, 2, "[num_tokens, rank]")
    check_dim("lora_b", lora_b, 3, "[num_slots, out_features, rank]")
    for name, tensor in (("y", y), ("t", t), ("lora_b", lora_b)):
        check_dtype(name, tensor, FLOAT_DTYPES)
        check_last_dim_contiguous(name, tensor)
    check_same_device(y=y, t=t, lora_b=lora_b, slots=slots)
    num_tokens, n = y.shape
    rank = lora_b.shape[2]
    if lora_b.shape[1] != n or t.shape != (num_tokens, rank):
        raise KernelArgumentError(f"shapes disagree: y {tuple(y.shape)}, t {tuple(t.shape)}, "
                                  f"lora_b {tuple(lora_b.shape)} (want [T, N], [T, R], "
                                  "[S, N, R])")
    _check_common(slots, num_tokens, rank)
    if num_tokens:
        block_n = 64
        _lora_expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
            t, lora_b, slots, y, n, rank, t.stride(0), lora_b.stride(0), lora_b.stride(1),
            y.stride(0), BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank))
