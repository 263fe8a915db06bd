"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm, no qkv bias) with sparse MoE layers.

Layer i is sparse unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step``
is non-zero (then it has a dense MLP of ``intermediate_size``). The router takes the softmax
over all experts, then the top k, renormalised when ``norm_topk_prob``; each expert has
``moe_intermediate_size``. There is no shared expert (Qwen2-MoE has one).
"""
from __future__ import annotations

from typing import Any

from hpcinfer.layers.moe import MoESpec
from hpcinfer.models.mixtral import MoECausalLM


def qwen_is_moe_layer(config: Any, layer_idx: int) -> bool:
    """transformers' rule for Qwen2/3-MoE."""
    return (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (layer_idx + 1) % config.decoder_sparse_step == 0)


def qwen_moe_spec(config: Any) -> MoESpec:
    return MoESpec(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                   hidden_size=config.hidden_size,
                   intermediate_size=config.moe_intermediate_size,
                   scoring="softmax_topk", renormalize=bool(config.norm_topk_prob))


class QwenMoeCausalLM(MoECausalLM):
    """Qwen2-MoE's and Qwen3-MoE's shared layout: which layers are sparse, and the router."""

    @staticmethod
    def is_moe_layer(config: Any, layer_idx: int) -> bool:
        return qwen_is_moe_layer(config, layer_idx)

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        return qwen_moe_spec(config)


class Qwen3MoeForCausalLM(QwenMoeCausalLM):
    has_qk_norm = True

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        # transformers applies config.sliding_window (None unless use_sliding_window) to all.
        return getattr(config, "sliding_window", None) or None
