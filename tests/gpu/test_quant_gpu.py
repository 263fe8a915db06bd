"""Quantized GEMM kernels on a real GPU at Llama-3.1-8B / 70B layer shapes, against
kernels/quant_reference.py run on the GPU, and the quantized layers' W8A8 / W4A16 paths.

Not part of CI: run through tests/gpu/quant_checks.sh (or run_gpu_checks.sh) on a GPU.
Errors are ||out - ref|| / ||ref||; bf16 included (the CPU interpreter cannot run it).
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import quant_reference as kref
from hpcinfer.kernels.fp8_gemm import fp8_block_gemm, fp8_scaled_mm
from hpcinfer.kernels.w4a16_gemm import w4a16_gemm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/quant_checks.sh on a GPU")
DEVICE = "cuda"
# (K, N): 8B q/k/v, 8B down, 70B gate/up (one of the two pieces)
SHAPES = [(4096, 6144), (14336, 4096), (8192, 28672)]
TOKENS = [1, 16, 2048]


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN"
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def fp8_supported() -> bool:
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])   # fp16/fp32: the interpreter tests
@pytest.mark.parametrize("group, desc_act", [(128, False), (32, False), (128, True)])
def test_w4a16_full_shapes(k, n, m, dtype, group, desc_act):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    codes = torch.randint(0, 16, (k, n), generator=g, device=DEVICE)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, device=DEVICE, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=g, device=DEVICE) * 0.02 + 0.001
    g_idx = (torch.randperm(k, generator=g, device=DEVICE).to(torch.int32) // group
             if desc_act else None)
    qweight = kref.pack_k(codes)
    a = torch.randn(m, k, generator=g, device=DEVICE).to(dtype)
    got = w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    want = kref.w4a16_gemm(a, qweight, zeros, scales, g_idx, group)
    assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_block_full_shapes(k, n, m):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    x = torch.randn(m, k, generator=g, device=DEVICE)
    w = torch.randn(n, k, generator=g, device=DEVICE)
    block = (128, 128)
    a, a_scales = kref.quantize_per_token_group(x, 128)
    b_scales = (w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3)) / 448)
    b = (w / b_scales.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(kref.FP8)
    got = fp8_block_gemm(a, a_scales, b, b_scales, block, torch.bfloat16)
    want = kref.fp8_block_gemm(a, a_scales, b, b_scales, block, torch.float32)
    assert rel_err(got, want) < 1e-2
    # and against the unquantized product: e4m3 rounding of both operands only
    assert rel_err(got, x @ w.t()) < 6e-2


@pytest.mark.skipif(not fp8_supported(), reason="e4m3 needs compute capability >= 8.9")
@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
def test_fp8_rowwise_scaled_mm(k, n, m):
    g = torch.Generator(device=DEVICE).manual_seed(k + n + m)
    x = torch.randn(m, k, generator=g, device=DEVICE).bfloat16()
    w = torch.randn(n, k, generator=g, device=DEVICE)
    w_scales = w.abs().amax(dim=1) / 448
    b = (w / w_scales[:, None]).to(kref.FP8)
    a, a_scales = kref.quantize_per_token(x)
    got = fp8_scaled_mm(a, a_scales, b.t(), w_scales.reshape(1, -1), torch.bfloat16)
    want = (a.float() * a_scales) @ (b.float() * w_scales[:, None]).t()
    assert rel_err(got, want) < 1e-2
