"""Gated activations: SiLU-and-mul (SwiGLU) and GeLU-tanh-and-mul (GeGLU).

References: :func:`hpcinfer.kernels.reference.silu_and_mul` and ``gelu_tanh_and_mul``.
x = [gate | up] along the last dim; out = act(gate) * up, half as wide. The activation is
rounded to x's dtype before the product, as the unfused torch ops round it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, KernelArgumentError, check_dtype,
                            check_last_dim_contiguous, check_out)

# A jit function may read a global only if it is a tl.constexpr.
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _gated_activation_kernel(X, OUT, stride_x, stride_o, d, IS_GELU: tl.constexpr,
                             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_GELU:
        # tanh(y) = 1 - 2 / (exp(2y) + 1): exact limits at +-inf, and no libdevice needed.
        y = SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        y = tl.minimum(tl.maximum(y, -15.0), 15.0)   # tanh is +-1 in fp32 there; no overflow
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    else:
        act = gate * tl.sigmoid(gate)
    act = act.to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (act * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:], x: [..., 2 * d] -> [..., d]."""
    return _gated_activation(x, out, is_gelu=False)


def gelu_tanh_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(x[..., :d]) * x[..., d:], x: [..., 2 * d] -> [..., d]."""
    return _gated_activation(x, out, is_gelu=True)


def _gated_activation(x: torch.Tensor, out: torch.Tensor | None, *, is_gelu: bool
                      ) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise KernelArgumentError(f"x must be [..., 2 * d] (gate then up), got {tuple(x.shape)}")
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    d = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], d)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    check_out(out, out_shape, x.dtype, x.device)
    x2 = x.reshape(-1, 2 * d)
    try:
        out2 = out.view(-1, d)
    except RuntimeError as e:
        raise KernelArgumentError("out must be contiguous") from e
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(triton.next_power_of_2(d), 2048)
    grid = (x2.shape[0], triton.cdiv(d, block))
    _gated_activation_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), d,
                                   IS_GELU=is_gelu, BLOCK=block, num_warps=4)
    return out
