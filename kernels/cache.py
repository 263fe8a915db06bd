"""KV-cache write: scatter this step's keys and values into the paged cache by slot.

Reference: :func:`hpcinfer.kernels.reference.reshape_and_cache`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KV_CACHE_DTYPES, check_dim, check_dtype,
                            check_head_dim, check_last_dim_contiguous, check_same_device)


@triton.jit
def _reshape_and_cache_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, SLOT_MAPPING,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,          # shared by k_cache and v_cache (checked)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SATURATE_FP8: tl.constexpr = False,
):
    # One program per token: it copies all kv heads of that token, [BLOCK_H, BLOCK_D] at once.
    token = tl.program_id(0)
    slot = tl.load(SLOT_MAPPING + token).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot is CUDA-graph padding: write nothing (the test is broadcast to a
    # vector because the interpreter rejects a scalar mask term).
    head_ok = (offs_h < NUM_KV_HEADS) & (offs_h * 0 + slot >= 0)
    mask = head_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(KEY + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(VALUE + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask)
    dst = block * stride_cb + offset * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    if SATURATE_FP8:   # an e4m3 cache: clamp to its largest finite value, as torch's cast does
        k = tl.minimum(tl.maximum(k.to(tl.float32), -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -448.0), 448.0)
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches, in place.

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; slot_mapping:
    [num_tokens] int32/int64, negative = skip. key/value may be strided views (e.g. slices of
    a fused qkv output) as long as their last dim is contiguous.
    """
    check_dim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    check_dim("k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache (shape {tuple(v_cache.shape)}, strides {v_cache.stride()}) "
                         f"must match k_cache (shape {tuple(k_cache.shape)}, strides "
                         f"{k_cache.stride()})")
    num_tokens, num_kv_heads, head_dim = key.shape
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"key is [.., {num_kv_heads}, {head_dim}] but the cache holds "
                         f"[.., {k_cache.shape[2]}, {k_cache.shape[3]}] per token")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    check_head_dim(head_dim)
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t, FLOAT_DTYPES if name in ("key", "value") else KV_CACHE_DTYPES)
        check_last_dim_contiguous(name, t)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    check_last_dim_contiguous("slot_mapping", slot_mapping)
    check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache,
                      slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        SATURATE_FP8=k_cache.dtype == torch.float8_e4m3fn,
    )
