"""Fused RMSNorm, optionally with the residual add that precedes it.

Reference: :func:`hpcinfer.kernels.reference.rms_norm`. One program normalises one row; the
residual add, the fp32 statistics and the scaling happen in registers, so x and the residual
are read once and the output (and the new residual) written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, KernelArgumentError, check_dtype,
                            check_last_dim_contiguous, check_out, check_same_device)

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    X, RESIDUAL, WEIGHT, OUT, RESIDUAL_OUT,
    stride_x, stride_r, stride_o, stride_ro,
    hidden_size, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to x's dtype, as the unfused `x + residual` would be.
        r = tl.load(RESIDUAL + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RESIDUAL_OUT + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden_size + eps)
    h = h * rstd
    w = tl.load(WEIGHT + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        out = h * (weight_offset + w)                        # Gemma: scale in fp32, then cast
    else:
        out = w * h.to(X.dtype.element_ty).to(tl.float32)    # Llama: cast, then scale
    tl.store(OUT + row * stride_o + offs, out.to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, weight_offset: float = 0.0,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim of x [..., hidden]; returns (normed, new_residual).

    Same arguments and result as the reference, plus preallocated ``out`` and
    ``residual_out`` (pass ``residual_out=residual`` to update the residual in place; by
    default a new tensor is returned and no input is modified).
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise KernelArgumentError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise KernelArgumentError(f"hidden size {hidden} > {MAX_HIDDEN} is not supported")
    for name, t in (("x", x), ("weight", weight)):   # weight is 1-D: this checks stride 1
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_dim_contiguous(name, t)
    check_same_device(x=x, weight=weight)
    out_dtype = x.dtype if weight_offset else torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    check_out(out, tuple(x.shape), out_dtype, x.device)
    x2 = x.reshape(-1, hidden)
    out2 = _rows_view("out", out, hidden)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise KernelArgumentError(f"residual ({tuple(residual.shape)}, {residual.dtype}) "
                                      f"must match x ({tuple(x.shape)}, {x.dtype})")
        check_same_device(x=x, residual=residual)
        if residual_out is None:
            residual_out = torch.empty_like(x)
        check_out(residual_out, tuple(x.shape), x.dtype, x.device)
        r2 = residual.reshape(-1, hidden)
        ro2 = _rows_view("residual_out", residual_out, hidden)
    else:
        r2 = ro2 = x2   # unused when HAS_RESIDUAL is False
        residual_out = None
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_rows,)](
        x2, r2, weight, out2, ro2,
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        hidden, eps, float(weight_offset),
        HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(weight_offset), BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out, residual_out


def _rows_view(name: str, t: torch.Tensor, hidden: int) -> torch.Tensor:
    # Outputs must be writable through a 2-D view; a reshape copy would drop the writes.
    try:
        return t.view(-1, hidden)
    except RuntimeError as e:
        raise KernelArgumentError(f"{name} cannot be viewed as rows of {hidden}: pass a "
                                  "contiguous tensor") from e
