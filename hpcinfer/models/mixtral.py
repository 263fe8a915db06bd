"""Mixtral: Mistral with a sparse MoE block in place of every MLP; the base of the MoE families.

The MoE block is ``hpcinfer.layers.moe.SparseMoE`` (router + fused experts); a family only
says which layers are sparse (``is_moe_layer``) and fills a ``MoESpec`` (``moe_spec``).
Mixtral routes each token to the top 2 of 8 experts by softmax, renormalised.

Checkpoint names: ``block_sparse_moe.gate`` is the router and ``block_sparse_moe.experts.E.
{w1,w3,w2}`` are expert E's gate, up and down projections; they load into the stacked
``mlp.experts.gate_up_proj.weight`` / ``down_proj.weight`` (layers/moe.py).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from hpcinfer.layers.attention import AttentionBackend
from hpcinfer.layers.linear import NO_TP, TensorParallel
from hpcinfer.layers.moe import MoESpec, SparseMoE, expert_checkpoint_mapping
from hpcinfer.models.llama import LlamaForCausalLM


class MoECausalLM(LlamaForCausalLM):
    """A Llama-shaped decoder whose sparse layers run ``SparseMoE`` instead of the MLP."""

    supports_expert_parallel = True
    # Checkpoint projection name -> "gate" / "up" / "down" of one expert.
    expert_tensor_names: dict[str, str] = {"gate_proj": "gate", "up_proj": "up",
                                           "down_proj": "down"}

    def __init__(self, config: Any, *, attention_backend: AttentionBackend,
                 tp: TensorParallel = NO_TP, expert_parallel: bool = False):
        self.expert_parallel = expert_parallel
        super().__init__(config, attention_backend=attention_backend, tp=tp)
        # Per instance: the mapping lists every expert of this config.
        self.packed_modules_mapping = {
            **type(self).packed_modules_mapping,
            **expert_checkpoint_mapping("experts", self.moe_spec(config).num_experts,
                                        self.expert_tensor_names)}

    def make_mlp(self, config: Any, layer_idx: int, tp: TensorParallel) -> nn.Module:
        if self.is_moe_layer(config, layer_idx):
            return self.make_moe(config, tp)
        return super().make_mlp(config, layer_idx, tp)

    def make_moe(self, config: Any, tp: TensorParallel) -> nn.Module:
        return SparseMoE(self.moe_spec(config), tp, expert_parallel=self.expert_parallel)

    @staticmethod
    def is_moe_layer(config: Any, layer_idx: int) -> bool:
        return True

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        raise NotImplementedError


class MixtralForCausalLM(MoECausalLM):
    expert_tensor_names = {"w1": "gate", "w3": "up", "w2": "down"}

    @staticmethod
    def moe_spec(config: Any) -> MoESpec:
        return MoESpec(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                       hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size,
                       scoring="softmax_topk", renormalize=True)

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None)
