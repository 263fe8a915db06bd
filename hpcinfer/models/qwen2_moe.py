"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (qkv bias) with sparse MoE layers
whose output adds a shared expert, scaled by a sigmoid gate per token:

    out = experts(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

The shared expert is a dense SwiGLU MLP of ``shared_expert_intermediate_size`` (tensor
parallel like any MLP); ``shared_expert_gate`` is a [1, hidden] linear, replicated. Routing,
``norm_topk_prob``, ``decoder_sparse_step`` and ``mlp_only_layers`` are Qwen3-MoE's.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from hpcinfer.layers.linear import ReplicatedLinear, TensorParallel
from hpcinfer.layers.moe import MoESpec, SparseMoE
from hpcinfer.models.llama import LlamaMLP
from hpcinfer.models.qwen2 import qwen_sliding_window_for
from hpcinfer.models.qwen3_moe import QwenMoeCausalLM


class SharedExpertMoE(SparseMoE):
    """SparseMoE plus a gated shared expert that every token goes through."""

    def __init__(self, spec: MoESpec, config: Any, tp: TensorParallel, *,
                 expert_parallel: bool = False):
        super().__init__(spec, tp, expert_parallel=expert_parallel)
        shared = SimpleNamespace(hidden_size=config.hidden_size, hidden_act=config.hidden_act,
                                 intermediate_size=config.shared_expert_intermediate_size)
        self.shared_expert = LlamaMLP(shared, tp)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]; the gate is [T, 1], broadcast over the hidden size.
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen2MoeForCausalLM(QwenMoeCausalLM):

    def __init__(self, config: Any, **kwargs):
        self.qkv_bias = getattr(config, "qkv_bias", True)   # read by _make_layer
        super().__init__(config, **kwargs)

    def make_moe(self, config: Any, tp: TensorParallel) -> nn.Module:
        if not getattr(config, "shared_expert_intermediate_size", 0):
            return super().make_moe(config, tp)
        return SharedExpertMoE(self.moe_spec(config), config, tp,
                               expert_parallel=self.expert_parallel)

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return qwen_sliding_window_for(config, layer_idx)
