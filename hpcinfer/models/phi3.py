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


def _split_rows(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor,
                row_sizes: list[int]) -> list[torch.Tensor]:
    """The pieces of a fused checkpoint tensor, one per merged piece (q, k, v; gate, up).

    Which dim follows the output rows, and how many rows one element covers, is the
    parameter's ParamSharding (hpcinfer.layers.quant.base): a plain or e4m3 weight [out, in]
    splits its rows, an fp8 block scale [out/B0, in/B1] its blocks, AWQ/GPTQ tensors their
    packed output columns. A parameter not split along the output (one scale for the whole
    fused tensor, GPTQ's g_idx) goes whole to every piece. ``loaded`` may be a lazy slice."""
    sharding = layer.shardings.get(layer._name_of(param))
    if sharding is None or sharding.per_piece or sharding.out_dim is None:
        return [loaded] * len(row_sizes)
    per, dim = sharding.out_per_element, sharding.out_dim
    if any(size % per for size in row_sizes):
        raise ValueError(f"a fused tensor with pieces of {row_sizes} rows cannot be split "
                         f"into elements of {per} rows each (a quantization block or pack "
                         "crosses two pieces): this checkpoint's quantization does not fit "
                         "the model's fused projections")
    sizes = [size // per for size in row_sizes]
    if loaded.shape[dim] != sum(sizes):
        expected = list(loaded.shape)
        expected[dim] = sum(sizes)
        raise WeightShapeError(tuple(expected), tuple(loaded.shape))
    pieces, offset = [], 0
    for size in sizes:
        pieces.append(loaded.narrow(dim, offset, size))
        offset += size
    return pieces


class FusedQKVParallelLinear(QKVParallelLinear):
    """``qkv_proj`` loaded from one checkpoint tensor ``[q | k | v]`` (all heads), plain or
    quantized (each of the method's tensors split by its own sharding)."""

    shard_ids = (None,)
    pieces = ("q", "k", "v")

    @property
    def out_pieces(self) -> list[int]:
        return [self._slices[s][1] for s in self.pieces]

    def piece_index(self, shard_id) -> int:
        return self.pieces.index(shard_id)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        q_rows = self.num_heads * self.tp.size * self.head_dim
        kv_rows = self.total_kv_heads * self.head_dim
        pieces = _split_rows(self, param, loaded_weight, [q_rows, kv_rows, kv_rows])
        for shard_id, piece in zip(self.pieces, pieces, strict=True):
            super().weight_loader(param, piece, shard_id)


class FusedMergedColumnParallelLinear(MergedColumnParallelLinear):
    """``gate_up_proj`` loaded from one checkpoint tensor ``[gate | up]``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_ids = (None,)  # one tensor fills it (the base class lists gate and up)

    def piece_index(self, shard_id) -> int:
        return shard_id

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        pieces = _split_rows(self, param, loaded_weight, self.output_sizes)
        for shard_id, piece in enumerate(pieces):
            super().weight_loader(param, piece, shard_id)


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: dict = {}  # the checkpoint already uses our merged names
    qkv_cls = FusedQKVParallelLinear
    gate_up_cls = FusedMergedColumnParallelLinear

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return MistralForCausalLM.sliding_window_for(config, layer_idx)
