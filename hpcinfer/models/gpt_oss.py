"""gpt-oss (gpt-oss-20b, gpt-oss-120b): a MoE decoder with attention sinks, alternating
sliding-window and full layers, biases everywhere and a clamped SwiGLU.

What differs from Mixtral: q/k/v/o biases; one learned sink logit per head in every
attention softmax (``self_attn.sinks``); ``layer_types`` alternates ``sliding_attention``
(window ``sliding_window``) and ``full_attention``; yarn rope; the router has a bias and
takes the softmax over the top-k *logits*; experts have biases and apply
``(up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = gate.clamp(max=limit)``
(``swiglu_alpha`` 1.702, ``swiglu_limit`` 7.0, as in OpenAI's reference implementation).

Checkpoints store the experts stacked and transposed (``mlp.experts.gate_up_proj`` [E, hidden,
2 * inter] with gate and up *interleaved*, ``down_proj`` [E, inter, hidden], ``*_bias``);
``StackedExpertWeight`` re-lays them out at load. The released checkpoints quantize experts
to MXFP4 (``*_blocks``/``*_scales``): hpcinfer.layers.quant.mxfp4 dequantizes them to the run
dtype at load (no MXFP4 kernel), so this file sees only unquantized experts.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from hpcinfer.layers.attention import Attention, AttentionBackend
from hpcinfer.layers.linear import TensorParallel
from hpcinfer.layers.moe import MoESpec, SparseMoE
from hpcinfer.layers.rotary import RotaryEmbedding
from hpcinfer.models.gemma2 import gemma_sliding_window_for
from hpcinfer.models.llama import LlamaDecoderLayer
from hpcinfer.models.mixtral import MoECausalLM


# Checkpoint name -> ours: the stacked expert tensors become stacked weight/bias params,
# the router is the MoE block's `gate`, the sinks belong to the Attention layer.
_RENAMES = (
    (re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)_bias$"), r".mlp.experts.\1.bias"),
    (re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$"), r".mlp.experts.\1.weight"),
    (re.compile(r"\.mlp\.router\."), ".mlp.gate."),
    (re.compile(r"\.self_attn\.sinks$"), ".self_attn.attn.sinks"),
)


class GptOssForCausalLM(MoECausalLM):
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                              "v_proj": ("qkv_proj", "v")}
    expert_tensor_names: dict[str, str] = {}     # stacked in the checkpoint: no per-expert names

    def _make_layer(self, config: Any, layer_idx: int, rotary_emb: RotaryEmbedding,
                    backend: AttentionBackend, tp: TensorParallel) -> LlamaDecoderLayer:
        layer = super()._make_layer(config, layer_idx, rotary_emb, backend, tp)
        old = layer.self_attn.attn   # the same attention, plus one sink logit per head
        layer.self_attn.attn = Attention(
            old.num_heads, old.num_kv_heads, old.head_dim, old.spec.scale, backend=backend,
            sliding_window=old.spec.sliding_window, has_sinks=True, tp=tp)
        return layer

    def make_moe(self, config: Any, tp: TensorParallel) -> nn.Module:
        return SparseMoE(self.moe_spec(config), tp, expert_parallel=self.expert_parallel,
                         stacked_format="gpt_oss")

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        return MoESpec(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                       hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size,
                       scoring="topk_softmax", renormalize=False, activation="swiglu_oai",
                       has_router_bias=True, has_expert_bias=True,
                       swiglu_alpha=float(getattr(config, "swiglu_alpha", 1.702)),
                       swiglu_limit=float(getattr(config, "swiglu_limit", 7.0)))

    @staticmethod
    def checkpoint_name(name: str) -> str:
        for pattern, replacement in _RENAMES:
            name = pattern.sub(replacement, name)
        return name

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return gemma_sliding_window_for(config, layer_idx)
