"""Argument checks shared by the Triton launchers.

Launchers are the boundary between model code and raw pointers: a wrong stride or dtype
there reads garbage instead of failing, so every launcher checks what its kernel assumes and
says how to fix the call. None of these checks look at tensor *values* (that would sync with
the host and break CUDA-graph capture); they only read shapes, strides, dtypes and devices.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# KV caches may also hold e4m3 (kv_cache_dtype="fp8", per-tensor scale 1.0): written with a
# saturating cast, read back in q's dtype.
KV_CACHE_DTYPES = FLOAT_DTYPES + (torch.float8_e4m3fn,)
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def interpreted() -> bool:
    """Kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, the CI tests): some
    launchers pick small tiles or work around the interpreter's numeric gaps there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class KernelArgumentError(ValueError):
    """A launcher was called with arguments its kernel cannot handle."""


def check_dim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise KernelArgumentError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise KernelArgumentError(f"{name} has dtype {t.dtype}; supported: {names}")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    # Kernels address the last dim as base + arange(), i.e. stride 1; other dims take any stride.
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelArgumentError(
            f"{name} must have stride 1 in its last dim (got strides {t.stride()}): "
            "pass a view of a contiguous tensor or call .contiguous()")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise KernelArgumentError(f"{name} must be contiguous (strides {t.stride()}); "
                                  "call .contiguous() on it")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelArgumentError(f"all tensors must be on one device, got {listed}")


def check_head_dim(head_dim: int) -> None:
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise KernelArgumentError(f"head_dim={head_dim} is not supported: the Triton kernels "
                                  f"take 1..{MAX_HEAD_DIM}; use the torch_ref backend")


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> None:
    """A caller-provided output (e.g. a CUDA-graph buffer) must match what we would allocate."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise KernelArgumentError(
            f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; expected "
            f"{tuple(shape)}, {dtype} on {device}")
    check_last_dim_contiguous("out", out)


def check_sinks(sinks: torch.Tensor, num_heads: int, device: torch.device) -> None:
    """Attention sinks: one logit per query head, [num_heads], any float dtype."""
    if tuple(sinks.shape) != (num_heads,):
        raise KernelArgumentError(f"sinks must be [num_heads] = [{num_heads}] (one logit per "
                                  f"query head), got {tuple(sinks.shape)}")
    check_dtype("sinks", sinks, FLOAT_DTYPES)
    check_last_dim_contiguous("sinks", sinks)
    if sinks.device != device:
        raise KernelArgumentError(f"sinks is on {sinks.device}, q on {device}: move the layer's "
                                  "sinks with the model")
