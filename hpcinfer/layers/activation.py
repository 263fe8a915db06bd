"""Activations by their config name: gated ones (``[gate | up]`` in, half out) and plain ones."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers import ops


class SiluAndMul(nn.Module):
    """SwiGLU (Llama, Mistral, Qwen): x [T, 2 * I] -> silu(gate) * up [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """GeGLU with the tanh approximation (Gemma): x [T, 2 * I] -> gelu(gate) * up [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x)


# HF config names (``hidden_act``) of the gated MLPs. Gemma checkpoints that say "gelu" mean
# the tanh approximation (transformers rewrites it the same way).
_GATED = {
    "silu": SiluAndMul, "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul, "gelu_tanh": GeluTanhAndMul, "gelu": GeluTanhAndMul,
}

_PLAIN = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP
}


def get_gated_activation(name: str) -> nn.Module:
    """The gated activation module for an HF ``hidden_act`` name."""
    try:
        return _GATED[name]()
    except KeyError:
        raise ValueError(f"unsupported gated activation {name!r}; supported: "
                         f"{sorted(_GATED)}") from None


class PlainActivation(nn.Module):
    """A non-gated activation (OPT's ReLU) by its HF ``activation_function`` name."""

    def __init__(self, name: str):
        super().__init__()
        if name not in _PLAIN:
            raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_PLAIN)}")
        self.name = name
        self._fn = _PLAIN[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)
