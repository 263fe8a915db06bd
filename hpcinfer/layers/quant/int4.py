"""4-bit weights, 16-bit activations (W4A16): AWQ (GEMM), GPTQ and compressed-tensors
pack-quantized, each loaded in its own packed layout and turned into one canonical form.

On CUDA the canonical form is packed for the Triton dequantize-in-the-GEMM kernel
(hpcinfer.kernels.w4a16_gemm: the fused kernel at decode M, a dequantize pass + cuBLAS from
w4a16_gemm.DEQUANT_MIN_M rows on); elsewhere, CPU included, the weights are dequantized once to the
compute dtype (the reference path the tests hold to transformers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.quant import reference as ref
from hpcinfer.layers.quant.base import (ParamSharding, QuantMethod, add_param, dummy_range,
                                        random_words, replace_weight, uniform_)
from hpcinfer.layers.quant.config import PACK, QuantSpec

_I32 = torch.int32


def _nibbles(code: int) -> int:
    """The int32 word whose eight 4-bit codes all equal ``code``."""
    word = sum(code << (4 * i) for i in range(PACK))
    return word - 2 ** 32 if word >= 2 ** 31 else word


class Int4Method(QuantMethod):
    name = "int4"

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.name = f"int4-{spec.layout}"

    def _groups(self, layer: nn.Module, replicated: bool) -> tuple[int, int]:
        """(number of groups, input features per group) of this rank's scales."""
        inp = getattr(layer, "full_input_size", layer.input_size) if replicated \
            else layer.input_size
        size = getattr(layer, "full_input_size", layer.input_size) \
            if self.spec.group_size == -1 else self.spec.group_size
        return -(-inp // size), size

    def create_weights(self, layer: nn.Module) -> None:
        out, inp = layer.output_size, layer.input_size
        # With desc_act a row-parallel rank's inputs may use any group, and per-channel scales
        # have one group over all ranks' inputs: keep all groups on every rank.
        replicated = ((self.spec.desc_act or self.spec.group_size == -1)
                      and getattr(layer, "splits_input", False))
        groups, size = self._groups(layer, replicated)
        in_dim_of_groups = None if replicated else 0
        layout = self.spec.layout
        if layout == "awq":
            add_param(layer, "qweight", (inp, out // PACK), _I32,
                      ParamSharding(out_dim=1, in_dim=0, out_per_element=PACK))
            add_param(layer, "qzeros", (groups, out // PACK), _I32,
                      ParamSharding(1, in_dim_of_groups, PACK, size))
            add_param(layer, "scales", (groups, out), torch.float32,
                      ParamSharding(1, in_dim_of_groups, 1, size))
        elif layout == "gptq":
            add_param(layer, "qweight", (inp // PACK, out), _I32,
                      ParamSharding(out_dim=1, in_dim=0, in_per_element=PACK))
            add_param(layer, "qzeros", (groups, out // PACK), _I32,
                      ParamSharding(1, in_dim_of_groups, PACK, size))
            add_param(layer, "scales", (groups, out), torch.float32,
                      ParamSharding(1, in_dim_of_groups, 1, size))
            add_param(layer, "g_idx", (len(layer.out_pieces), inp), _I32,
                      ParamSharding(out_dim=None, in_dim=1, per_piece=True))
        else:
            gi = None if replicated else 1
            add_param(layer, "weight_packed", (out, inp // PACK), _I32,
                      ParamSharding(out_dim=0, in_dim=1, in_per_element=PACK))
            add_param(layer, "weight_scale", (out, groups), torch.float32,
                      ParamSharding(0, gi, 1, size))
            if self.spec.has_zeros:
                add_param(layer, "weight_zero_point", (-(-out // PACK), groups), _I32,
                          ParamSharding(0, gi, PACK, size))
            if self.spec.desc_act:
                add_param(layer, "weight_g_idx", (len(layer.out_pieces), inp), _I32,
                          ParamSharding(out_dim=None, in_dim=1, per_piece=True))

    def dummy_weights(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Random packed codes (every nibble uniform 0..15), zero points 8 (stored as the
        layout stores them), scales in [0.5, 1] x range/8 per group, and consecutive groups for
        g_idx: dequantized weights within +-dummy_range(layer)."""
        r, layout = dummy_range(layer), self.spec.layout
        main, scale = (("weight_packed", "weight_scale") if layout == "pack_quantized"
                       else ("qweight", "scales"))
        random_words(getattr(layer, main).data, gen)
        uniform_(getattr(layer, scale).data, 0.25, gen).add_(0.75).mul_(r / 8)
        zero_name = "weight_zero_point" if layout == "pack_quantized" else "qzeros"
        if zero_name in layer._parameters:
            offset = self.spec.gptq_zero_offset if layout == "gptq" else 0
            getattr(layer, zero_name).data.fill_(_nibbles(8 - offset))
        g_name = "weight_g_idx" if layout == "pack_quantized" else "g_idx"
        if g_name in layer._parameters:
            g = getattr(layer, g_name).data
            _, size = self._groups(layer, replicated=False)
            g.copy_(ref.group_index(layer.input_size, size, g.device).to(_I32).expand_as(g))
        if layer.bias is not None:
            uniform_(layer.bias.data, r, gen)

    def canonical(self, layer: nn.Module):
        """(q [out, in], zeros [out, groups], scales [out, groups], g_idx [out pieces][in])."""
        layout = self.spec.layout
        if layout == "awq":
            q, zeros, scales = ref.awq_canonical(layer.qweight, layer.qzeros, layer.scales)
        elif layout == "gptq":
            q, zeros, scales = ref.gptq_canonical(layer.qweight, layer.qzeros, layer.scales,
                                                  self.spec.gptq_zero_offset)
        else:
            q, zeros, scales = ref.pack_quantized_canonical(
                layer.weight_packed, layer.weight_scale,
                getattr(layer, "weight_zero_point", None))
        return q, zeros, scales, self.group_indices(layer, q.device)

    def group_indices(self, layer: nn.Module, device: torch.device) -> list[torch.Tensor]:
        """Each merged piece's group of every input feature (this rank's inputs)."""
        stored = {"gptq": "g_idx", "pack_quantized": "weight_g_idx"}.get(self.spec.layout)
        if self.spec.desc_act and stored is not None:
            return list(getattr(layer, stored))
        _, size = self._groups(layer, replicated=False)
        g = ref.group_index(layer.input_size, size, device)
        return [g] * len(layer.out_pieces)

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        q, zeros, scales, g_idx = self.canonical(layer)
        rows, start = [], 0
        for piece_rows, g in zip(layer.out_pieces, g_idx):
            sl = slice(start, start + piece_rows)
            rows.append(ref.dequant_int4(q[sl], zeros[sl], scales[sl], g.to(q.device)))
            start += piece_rows
        return torch.cat(rows)

    def process_after_loading(self, layer: nn.Module) -> None:
        names = tuple(layer.shardings)
        device = getattr(layer, "scales" if self.spec.layout != "pack_quantized"
                         else "weight_scale").device
        drop = tuple(n for n in names if n != "bias")
        if device.type == "cuda" and self._prepare_kernel(layer, drop):
            return
        replace_weight(layer, self.dequantized(layer).to(layer.params_dtype), drop=drop)

    def _prepare_kernel(self, layer: nn.Module, drop: tuple[str, ...]) -> bool:
        """Repack for hpcinfer.kernels.w4a16_gemm; False when the layer does not fit it (K not
        a multiple of 64, or merged pieces with different act orders): dequantize instead."""
        from hpcinfer.kernels.quant_reference import pack_k
        if layer.input_size % 64:
            return False
        q, zeros, scales, g_idx = self.canonical(layer)
        if self.spec.desc_act and any(not torch.equal(g, g_idx[0]) for g in g_idx[1:]):
            return False
        layer.w4_qweight = pack_k(q.t().contiguous())
        layer.w4_zeros = zeros.t().to(_I32).contiguous()
        layer.w4_scales = scales.t().float().contiguous()
        layer.w4_g_idx = g_idx[0].to(_I32).contiguous() if self.spec.desc_act else None
        layer.w4_group_size = (layer.input_size if self.spec.group_size == -1
                               else self.spec.group_size)
        for name in drop:
            del layer._parameters[name], layer.shardings[name]
        return True

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if "weight" in layer._parameters:
            return F.linear(x, layer.weight, bias)
        from hpcinfer.kernels.w4a16_gemm import w4a16_linear   # picks the path by M
        y = w4a16_linear(x.reshape(-1, x.shape[-1]), layer.w4_qweight, layer.w4_zeros,
                         layer.w4_scales, layer.w4_g_idx, layer.w4_group_size)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
