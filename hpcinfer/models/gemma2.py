"""Gemma 2: Gemma with a norm before *and* after attention and the MLP, capped logits, a
per-layer sliding window and its own attention scale.

What differs from Gemma (1): four RMSNorms per layer (``input``/``post_attention`` around
attention, ``pre_feedforward``/``post_feedforward`` around the MLP); attention logits capped
at ``attn_logit_softcapping`` and final logits at ``final_logit_softcapping`` (``cap *
tanh(x / cap)``); q.k scaled by ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
sliding and full layers as ``layer_types`` says (alternating in released checkpoints).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.attention import AttentionMetadata, KVCache
from hpcinfer.layers.norm import RMSNorm
from hpcinfer.models.llama import LlamaForCausalLM


class GemmaSandwichDecoderLayer(nn.Module):
    """Norms on both sides of attention and of the MLP (Gemma 2 and 3)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, config: Any, norm_offset: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, weight_offset=norm_offset)
        self.post_attention_layernorm = RMSNorm(size, eps, weight_offset=norm_offset)
        self.pre_feedforward_layernorm = RMSNorm(size, eps, weight_offset=norm_offset)
        self.post_feedforward_layernorm = RMSNorm(size, eps, weight_offset=norm_offset)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: KVCache, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # As in Llama the residual stream is carried apart: the post-norms see only their
        # block's output, and the next pre-norm adds it to the residual.
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


def gemma_sliding_window_for(config: Any, layer_idx: int) -> int | None:
    """Gemma 2/3 mark each layer ``sliding_attention`` or ``full_attention`` in ``layer_types``
    (transformers fills it from the older ``sliding_window_pattern`` when a config lacks it)."""
    is_sliding = config.layer_types[layer_idx] == "sliding_attention"
    return config.sliding_window if is_sliding else None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap); None (or 0, as some configs write it) leaves them as they are."""
    if not cap:
        return logits
    return torch.tanh(logits / cap) * cap


class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_offset = 1.0
    scales_embeddings = True
    decoder_layer_cls = GemmaSandwichDecoderLayer

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return gemma_sliding_window_for(config, layer_idx)

    @staticmethod
    def attention_scale(config: Any) -> float | None:
        return config.query_pre_attn_scalar ** -0.5

    @staticmethod
    def attention_logit_softcap(config: Any) -> float | None:
        return getattr(config, "attn_logit_softcapping", None) or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] -> capped logits [N, vocab_size] float32."""
        logits = super().compute_logits(hidden)
        return softcap(logits, getattr(self.config, "final_logit_softcapping", None))
