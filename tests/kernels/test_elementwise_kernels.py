"""KV-cache write, RMSNorm, rotary and gated activations (Triton, interpreted) vs the reference.

bf16 math is wrong in the interpreter (it computes on raw bits), so bf16 runs only on the GPU
(tests/gpu); fp32 and fp16 run here.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from hpcinfer.kernels.cache import reshape_and_cache
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.norm import rms_norm
from hpcinfer.kernels.rotary import rotary_embedding

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (3, 80)])
def test_reshape_and_cache_matches_reference(dtype, num_kv_heads, head_dim):
    num_blocks, block_size, num_tokens = 5, 16, 7
    # k and v as strided slices of one fused [T, 3 * kv_heads, head_dim] tensor, as after qkv.
    fused = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=dtype)
    k, v = fused[:, num_kv_heads:2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    slots = torch.tensor([0, 15, 16, -1, 33, 79, -5])        # block edges, padding, last slot
    caches = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    reference.reshape_and_cache(k, v, *expected, slots)
    reshape_and_cache(k, v, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_reshape_and_cache_casts_and_checks_shapes():
    k = torch.randn(3, 2, 64)
    cache = torch.zeros(2, 4, 2, 64, dtype=torch.float16)
    v_cache = torch.zeros_like(cache)
    reshape_and_cache(k, k, cache, v_cache, torch.tensor([1, 2, 7], dtype=torch.int32))
    assert torch.equal(cache.view(8, 2, 64)[[1, 2, 7]], k.half())
    with pytest.raises(ValueError, match="the cache holds"):
        reshape_and_cache(k[:, :1], k[:, :1], cache, v_cache, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        reshape_and_cache(k, k, cache, v_cache, torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_matches_reference(dtype, with_residual, weight_offset):
    x = torch.randn(3, 5, 96, dtype=dtype)           # [..., hidden], hidden not a power of 2
    weight = torch.randn(96, dtype=dtype)
    residual = torch.randn_like(x) if with_residual else None
    x_before = x.clone()
    expected, expected_res = reference.rms_norm(x, weight, 1e-6, residual,
                                                weight_offset=weight_offset)
    got, got_res = rms_norm(x, weight, 1e-6, residual, weight_offset=weight_offset)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    assert got.dtype == expected.dtype
    assert torch.equal(x, x_before)                  # inputs untouched by default
    if with_residual:
        assert torch.equal(got_res, expected_res)
    else:
        assert got_res is None


def test_rms_norm_in_place_residual_and_dtype_promotion():
    x, residual = torch.randn(4, 64, dtype=torch.float16), torch.randn(4, 64, dtype=torch.float16)
    weight = torch.randn(64)                          # fp32 weight: output promotes to fp32
    expected, expected_res = reference.rms_norm(x, weight, 1e-5, residual)
    got, got_res = rms_norm(x, weight, 1e-5, residual, residual_out=residual)
    assert got_res is residual and torch.equal(residual, expected_res)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(KernelArgumentError, match="weight must be"):
        rms_norm(x, weight[:10], 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (96, 32)])
def test_rotary_in_place_matches_reference(dtype, head_dim, rotary_dim):
    num_tokens, max_pos = 9, 40
    # q and k as strided views of a fused qkv output: the kernel must rotate them in place.
    qkv = torch.randn(num_tokens, 8 + 2 * 2, head_dim, dtype=dtype)
    q, k = qkv[:, :8], qkv[:, 8:10]
    untouched = qkv[:, 10:].clone()
    positions = torch.randint(0, max_pos, (num_tokens,))
    cos_sin = torch.randn(max_pos, rotary_dim)
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cos_sin)
    got_q, got_k = rotary_embedding(positions, q, k, cos_sin)
    assert got_q is q and got_k is k
    torch.testing.assert_close(q, expected_q, **TOL[dtype])
    torch.testing.assert_close(k, expected_k, **TOL[dtype])
    assert torch.equal(qkv[:, 10:], untouched)


def test_rotary_rejects_odd_rotary_dim():
    q, k = torch.randn(2, 2, 64), torch.randn(2, 1, 64)
    with pytest.raises(KernelArgumentError, match="must be even"):
        rotary_embedding(torch.tensor([0, 1]), q, k, torch.randn(4, 33))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,ref_op", [(silu_and_mul, reference.silu_and_mul),
                                       (gelu_tanh_and_mul, reference.gelu_tanh_and_mul)])
def test_gated_activation_matches_reference(dtype, op, ref_op):
    x = torch.randn(3, 2, 2 * 200, dtype=dtype) * 4   # d = 200: masked tail; large |x| too
    torch.testing.assert_close(op(x), ref_op(x), **TOL[dtype])
    out = torch.empty(3, 2, 200, dtype=dtype)
    assert op(x, out=out) is out
    with pytest.raises(KernelArgumentError, match="gate then up"):
        op(torch.randn(3, 5))


def test_triton_ops_is_a_drop_in_for_reference():
    # hpcinfer.layers.ops swaps modules by name: every reference op must exist here, with
    # the reference's positional parameters first.
    import inspect

    from hpcinfer.kernels import triton_ops
    for name in ("rms_norm", "rotary_embedding", "silu_and_mul", "gelu_tanh_and_mul",
                 "reshape_and_cache", "paged_attention", "paged_decode_attention"):
        ref_params = list(inspect.signature(getattr(reference, name)).parameters)
        ours = list(inspect.signature(getattr(triton_ops, name)).parameters)
        assert ours[:len(ref_params)] == ref_params, name
