"""Rotary position embedding (neox style) with the rope types of the supported families.

The inverse frequencies follow transformers' ``modeling_rope_utils`` exactly (default and
``llama3``, plus ``linear``); cos and sin are precomputed per position into one
``cos_sin_cache`` ``[max_position, rotary_dim]`` (cos | sin), kept in float32.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hpcinfer.layers import ops
from hpcinfer.models.support import SUPPORTED_ROPE_TYPES  # one table: the login side reads it


def rope_parameters_of(config: Any) -> dict:
    """The rope dict of an HF config: ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` + ``rope_scaling`` pair (transformers 4), normalised to one dict."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def inverse_frequencies(params: dict, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies for ``params`` (see ``rope_parameters_of``)."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: "
                         f"{list(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by these families")
    base = params["rope_theta"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly (transformers' _compute_llama3_parameters, same float order).
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H, D] and k [T, KVH, D] at ``positions`` [T]."""

    def __init__(self, head_dim: int, max_position: int, inv_freq: torch.Tensor):
        super().__init__()
        self.head_dim, self.max_position = head_dim, max_position
        self._inv_freq = inv_freq.detach().to("cpu", torch.float32)
        # Non-persistent: never in a checkpoint. The model is built on the meta device, so
        # `init_buffers` fills it once the model has real storage.
        self.register_buffer("cos_sin_cache", torch.empty(max_position, head_dim),
                             persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute cos/sin for every position, on the buffer's device, in float32."""
        device = self.cos_sin_cache.device
        inv_freq = self._inv_freq.to(device)
        t = torch.arange(self.max_position, device=device, dtype=torch.int64).float()
        freqs = t[:, None] * inv_freq[None, :]  # [max_position, head_dim / 2]
        self.cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary_embedding(positions, q, k, self.cos_sin_cache)


def get_rope(config: Any, head_dim: int, max_position: int) -> RotaryEmbedding:
    """The rotary embedding an HF config asks for."""
    return RotaryEmbedding(head_dim, max_position,
                           inverse_frequencies(rope_parameters_of(config), head_dim))
