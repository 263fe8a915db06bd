"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL (models/qwen2_vl.py) with a
different vision transformer: RMSNorm and a gated (SwiGLU) MLP in its blocks, an RMSNorm in
the merger, and window attention: patches are regrouped into windows of ``window_size``
pixels (in whole 2x2 merge blocks) and attend within their window, except in the
``fullatt_block_indexes`` blocks, which attend over the whole image; the merged tokens are put
back in image order at the end. The language model and its M-RoPE positions are Qwen2-VL's
(images; videos' ``second_per_grid_ts`` are not taken yet).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.activation import get_gated_activation
from hpcinfer.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from hpcinfer.layers.quant.base import UNQUANTIZED
from hpcinfer.layers.norm import RMSNorm
from hpcinfer.layers.transfer import to_device
from hpcinfer.models.qwen2_vl import (PatchMerger, Qwen2VisionTransformer,
                                      Qwen2VLForConditionalGeneration, VisionBlock)


PAD_HIDDEN_TO = 64


class GatedVisionMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with biases; gate/up_proj load into ``gate_up_proj``."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], True)
        self.down_proj = RowParallelLinear(hidden, dim, True)
        self.act_fn = get_gated_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))

    def after_loading(self) -> None:
        """On a GPU, pad the hidden size to a multiple of 64 with zeros (zero gate and up
        rows and biases, zero down columns: the padded activations are act(0) * 0 = 0 and add
        nothing). Why: Qwen2.5-VL's 3420 makes the down projection's rows 6840 bytes, not
        16-byte aligned, and cuBLAS then runs an sm80 kernel at a quarter of the speed of the
        gate_up GEMM with twice its work (one H200, workload V, run 7: 0.72 s of 9.2 s).
        Unquantized, unsplit layers only; the CPU keeps the checkpoint's shapes."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if (gate_up.weight.device.type == "cuda" and gate_up.quant_method is UNQUANTIZED
                and down.quant_method is UNQUANTIZED and gate_up.tp.size == down.tp.size == 1):
            self.pad_hidden(PAD_HIDDEN_TO)

    def pad_hidden(self, multiple: int) -> None:
        gate_up, down = self.gate_up_proj, self.down_proj
        hidden = down.input_size
        padded = -(-hidden // multiple) * multiple
        if padded == hidden:
            return
        weight = gate_up.weight.new_zeros(2 * padded, gate_up.input_size)
        weight[:hidden], weight[padded:padded + hidden] = gate_up.weight.data.split(hidden)
        gate_up.weight = nn.Parameter(weight, requires_grad=False)
        if gate_up.bias is not None:
            bias = gate_up.bias.new_zeros(2 * padded)
            bias[:hidden], bias[padded:padded + hidden] = gate_up.bias.data.split(hidden)
            gate_up.bias = nn.Parameter(bias, requires_grad=False)
        weight = down.weight.new_zeros(down.output_size, padded)
        weight[:, :hidden] = down.weight.data
        down.weight = nn.Parameter(weight, requires_grad=False)
        gate_up.output_sizes, gate_up.output_size = [padded, padded], 2 * padded
        down.input_size = padded


class Qwen2_5VisionTransformer(Qwen2VisionTransformer):
    @staticmethod
    def vision_width(config: Any) -> int:
        return config.hidden_size

    def make_block(self, config: Any) -> VisionBlock:
        mlp = GatedVisionMLP(self.width, config.intermediate_size, config.hidden_act)
        return VisionBlock(self.width, config.num_heads, mlp, norm_cls=RMSNorm)

    def make_merger(self, config: Any) -> PatchMerger:
        return PatchMerger(config.out_hidden_size, self.width, self.merge_size, norm_cls=RMSNorm)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embed.proj.weight
        x = F.linear(pixels.to(weight.dtype), weight.reshape(weight.shape[0], -1))
        order, window_lengths = self._windows(grids, x.device)
        unit = self.merge_size ** 2          # patches of one merge block stay together
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
        cos_sin = self._rope_table(grids, x.device)
        cos_sin = cos_sin.view(-1, unit, cos_sin.shape[-1])[order].flatten(0, 1)
        image_lengths = [h * w for t, h, w in grids for _ in range(t)]
        full = set(self.config.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos_sin, image_lengths if i in full else window_lengths)
        merged = self.merger(x)
        return merged[torch.argsort(order)]  # back to image order

    def _windows(self, grids, device) -> tuple[torch.Tensor, list[int]]:
        """(merge blocks in window order [num_blocks], patches per window), built on the host
        per distinct grid once (window_order) and sent in one copy (per window on the
        device it was a few launches each: 16 for every 448x448 image)."""
        m, side = self.merge_size, self.config.window_size // self.merge_size // \
            self.config.patch_size
        orders, lengths, first = [], [], 0
        for t, h, w in grids:
            order, window_lengths = window_order(t, h // m, w // m, side)
            orders.append(order + first)
            lengths += [n * m * m for n in window_lengths]
            first += order.size
        order = to_device(np.concatenate(orders), device)  # (layers/transfer.py)
        return order, lengths


@functools.lru_cache(maxsize=256)
def window_order(t: int, rows: int, cols: int, side: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """An image's merge blocks (t frames of rows x cols) in window order and the blocks per
    window: windows of side x side blocks tile each frame from the top left, the last row and
    column of windows may be cut (read-only: cached)."""
    blocks = np.arange(t * rows * cols).reshape(t, rows, cols)
    order, lengths = [], []
    for frame in blocks:
        for r in range(0, rows, side):
            for c in range(0, cols, side):
                window = frame[r:r + side, c:c + side].reshape(-1)
                order.append(window)
                lengths.append(window.size)
    order = np.concatenate(order)
    order.setflags(write=False)
    return order, tuple(lengths)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_cls = Qwen2_5VisionTransformer
