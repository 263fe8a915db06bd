"""RMSNorm (Llama-style and Gemma's ``(1 + w)``) fused with the residual add, and LayerNorm."""
from __future__ import annotations

import torch
from torch import nn

from hpcinfer.layers import ops


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; ``weight_offset=1.0`` is Gemma's ``x * (1 + w)``.

    ``forward(x)`` returns the normed x; ``forward(x, residual)`` adds the residual first and
    returns ``(normed, x + residual)`` so decoder layers carry the residual stream without an
    extra pass (the GPU kernel fuses both).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out, residual = ops.rms_norm(x, self.weight, self.eps, residual,
                                     weight_offset=self.weight_offset)
        return out if residual is None else (out, residual)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (HF names ``weight``/``bias``), here so every norm comes from one module."""
