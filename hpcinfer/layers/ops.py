"""The one switch point between the torch reference ops and the GPU kernels.

Every layer calls the elementwise and normalisation ops through this module, never
``kernels.reference`` or a Triton launcher directly. Today every device uses the torch
references (``hpcinfer.kernels.reference``); the GPU issue plugs the Triton launchers in
``_ops_for`` and nowhere else, so models and layers do not change.
"""
from __future__ import annotations

from types import ModuleType

import torch

from hpcinfer.kernels import reference


def _ops_for(x: torch.Tensor) -> ModuleType:
    # Why a function and not a constant: the choice depends on the tensor's device (CUDA ->
    # Triton launchers once they exist). The launchers take the reference signatures.
    del x
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
