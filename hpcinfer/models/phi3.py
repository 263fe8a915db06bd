"""Phi-3 / 3.5 / 4 / 4-mini: Llama whose checkpoints store q/k/v and gate/up already fused.

What differs: ``qkv_proj`` and ``gate_up_proj`` arrive as one tensor each; our layers of the
same names split them at load time into the pieces the merged layers take, so each
tensor-parallel rank still gets its own heads and rows. The rest is configuration the shared
layers read: ``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head), ``longrope``
(Phi-3.5, Phi-4-mini; ``su``/``yarn`` in old configs are longrope, as transformers maps them),
``sliding_window`` on every layer (Phi-3-mini-4k), a tied head where the config says so.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hpcinfer.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                    WeightShapeError)
from hpcinfer.models.llama import LlamaForCausalLM, MistralForCausalLM


def _split_rows(loaded: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    # loaded: [sum(sizes), ...] (a tensor or a lazy slice); a wrong total is a shape error.
    if loaded.shape[0] != sum(sizes):
        raise WeightShapeError((sum(sizes), *loaded.shape[1:]), tuple(loaded.shape))
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(loaded.narrow(0, offset, size))
        offset += size
    return pieces


class FusedQKVParallelLinear(QKVParallelLinear):
    """``qkv_proj`` loaded from one checkpoint tensor ``[q | k | v]`` (all heads)."""

    shard_ids = (None,)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        q_rows = self.num_heads * self.tp.size * self.head_dim
        kv_rows = self.total_kv_heads * self.head_dim
        pieces = _split_rows(loaded_weight, [q_rows, kv_rows, kv_rows])
        for shard_id, piece in zip(("q", "k", "v"), pieces, strict=True):
            super().weight_loader(param, piece, shard_id)


class FusedMergedColumnParallelLinear(MergedColumnParallelLinear):
    """``gate_up_proj`` loaded from one checkpoint tensor ``[gate | up]``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_ids = (None,)  # one tensor fills it (the base class lists gate and up)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        for shard_id, piece in enumerate(_split_rows(loaded_weight, self.output_sizes)):
            super().weight_loader(param, piece, shard_id)


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: dict = {}  # the checkpoint already uses our merged names
    qkv_cls = FusedQKVParallelLinear
    gate_up_cls = FusedMergedColumnParallelLinear

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return MistralForCausalLM.sliding_window_for(config, layer_idx)
