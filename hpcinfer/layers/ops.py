"""The one switch point between the torch reference ops and the GPU kernels.

Every layer calls the elementwise and normalisation ops through this module, never
``kernels.reference`` or a Triton launcher directly. CUDA tensors go to the Triton launchers
(``hpcinfer.kernels.triton_ops``, which take the reference signatures); every other device
uses the torch references (``hpcinfer.kernels.reference``). Set ``HPCINFER_TORCH_OPS=1`` to
keep the references on CUDA too (for bisecting a numerical difference).

One behaviour differs and callers must allow for it: on CUDA ``rotary_embedding`` rotates q
and k in place (they are views of the fused qkv output, which nothing else reads) and returns
them; the reference returns new tensors.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from hpcinfer.kernels import reference


@functools.lru_cache(maxsize=1)
def _triton_ops() -> ModuleType | None:
    # Imported lazily: CPU-only installs and the login side never load Triton.
    if os.environ.get("HPCINFER_TORCH_OPS") == "1":
        return None
    from hpcinfer.kernels import triton_ops
    return triton_ops


def _ops_for(x: torch.Tensor) -> ModuleType:
    # Why a function and not a constant: the choice depends on the tensor's device.
    if x.is_cuda:
        return _triton_ops() or reference
    return reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, *, weight_offset: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See ``kernels.reference.rms_norm``: returns (normed, new residual or None)."""
    return _ops_for(x).rms_norm(x, weight, eps, residual, weight_offset=weight_offset)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``kernels.reference.rotary_embedding``: q [T, H, D], k [T, KVH, D] -> rotated."""
    return _ops_for(q).rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] = [gate | up] -> [T, I]."""
    return _ops_for(x).silu_and_mul(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] = [gate | up] -> [T, I]."""
    return _ops_for(x).gelu_tanh_and_mul(x)
