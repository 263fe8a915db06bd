"""FP8 (e4m3) weights: block-wise (HF ``fp8``, compressed-tensors block), per-channel
(compressed-tensors channel, FBGEMM, online), per-tensor (compressed-tensors tensor, serialized
``fp8`` without blocks).

Where the GPU runs FP8 (compute capability >= 8.9) the weights stay e4m3 (hpcinfer.kernels
.fp8_gemm). Per-tensor/per-channel scales: fp8_rowwise_linear picks by M, W8A16 (our Triton
GEMM upcasting the e4m3 weight, no activation quantization) up to W8A16_MAX_M rows, else W8A8
(one fused per-token quantization launch + torch._scaled_mm). Block-wise scales: W8A8 with the
fused per-token-group quantization and our Triton block-scaled GEMM.
Elsewhere, CPU included, the weights are dequantized once to the compute dtype and the layer
is a plain matmul: that is the reference path the tests hold to transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.layers.quant import reference as ref
from hpcinfer.layers.quant.base import (PER_PIECE, WEIGHT, ParamSharding, QuantMethod,
                                        add_param, dummy_range, replace_weight, uniform_)
from hpcinfer.layers.quant.config import QuantSpec


def runs_fp8(device: torch.device) -> bool:
    """Whether this device multiplies e4m3 natively (Ada/Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Method(QuantMethod):
    """e4m3 ``weight`` [out, in] with the scale parameters of ``spec.scheme``."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.name = spec.scheme
        self.scale_name = ("weight_scale_inv" if spec.method == "fp8" and spec.block
                           else "weight_scale")

    def create_weights(self, layer: nn.Module) -> None:
        out, inp = layer.output_size, layer.input_size
        add_param(layer, "weight", (out, inp), ref.FP8, WEIGHT)
        if self.spec.scheme == "fp8_block":
            b0, b1 = self.spec.block
            add_param(layer, self.scale_name, (-(-out // b0), -(-inp // b1)), torch.float32,
                      ParamSharding(out_per_element=b0, in_per_element=b1))
        elif self.spec.scheme == "fp8_channel":
            add_param(layer, self.scale_name, (out, 1), torch.float32,
                      ParamSharding(out_dim=0, in_dim=None))
        else:
            add_param(layer, self.scale_name, (len(layer.out_pieces),), torch.float32, PER_PIECE)
        if self.spec.static_input_scale:  # used by the W8A8 path only
            add_param(layer, "input_scale", (len(layer.out_pieces),), torch.float32, PER_PIECE)

    def dummy_weights(self, layer: nn.Module, gen: torch.Generator) -> None:
        """e4m3 codes uniform over +-448 and scales in [0.5, 1] x range/448 (per block, row or
        piece as the scheme has them): dequantized weights within +-dummy_range(layer)."""
        r = dummy_range(layer)
        uniform_(layer.weight.data, ref.FP8_MAX, gen)
        scale = getattr(layer, self.scale_name).data
        uniform_(scale, 0.25, gen).add_(0.75).mul_(r / ref.FP8_MAX)
        if "input_scale" in layer._parameters:   # static activation scale: |x| up to ~22
            layer.input_scale.data.fill_(0.05)
        if layer.bias is not None:
            uniform_(layer.bias.data, r, gen)

    def row_scales(self, layer: nn.Module) -> torch.Tensor:
        """Per-tensor scales spread over their pieces' rows: [out]."""
        scale = getattr(layer, self.scale_name)
        if self.spec.scheme == "fp8_channel":
            return scale.reshape(-1)
        return torch.cat([scale[i].expand(rows) for i, rows in enumerate(layer.out_pieces)])

    def dequantized(self, layer: nn.Module) -> torch.Tensor:
        if self.spec.scheme == "fp8_block":
            return ref.dequant_fp8_block(layer.weight, getattr(layer, self.scale_name),
                                         self.spec.block)
        return ref.dequant_fp8_rows(layer.weight, self.row_scales(layer))

    def process_after_loading(self, layer: nn.Module) -> None:
        if runs_fp8(layer.weight.device) and self._kernel_fits(layer):
            self._prepare_w8a8(layer)
            return
        replace_weight(layer, self.dequantized(layer).to(layer.params_dtype),
                       drop=("weight", self.scale_name, "input_scale"))

    def _kernel_fits(self, layer: nn.Module) -> bool:
        out, inp = layer.output_size, layer.input_size
        if self.spec.scheme == "fp8_block":
            return inp % self.spec.block[1] == 0 and self.spec.block[1] >= 16
        return inp % 16 == 0 and out % 16 == 0      # cuBLASLt's fp8 alignment

    def _prepare_w8a8(self, layer: nn.Module) -> None:
        # W8A8: the weight stays e4m3 [out, in]; activations are quantized per token (and per
        # K block for block-wise weights) at each call. Static input scales are not used.
        if self.spec.scheme == "fp8_block":
            layer.fp8_block_scales = getattr(layer, self.scale_name).data.contiguous()
        else:
            layer.fp8_row_scales = self.row_scales(layer).float().reshape(1, -1).contiguous()
        for name in (self.scale_name, "input_scale"):
            layer._parameters.pop(name, None)
            layer.shardings.pop(name, None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if layer.weight.dtype != ref.FP8:
            return F.linear(x, layer.weight, bias)
        from hpcinfer.kernels.fp8_gemm import fp8_block_gemm, fp8_rowwise_linear, quantize_fp8
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if self.spec.scheme == "fp8_block":
            a, a_scales = quantize_fp8(x2, self.spec.block[1])   # one fused launch
            y = fp8_block_gemm(a, a_scales, layer.weight, layer.fp8_block_scales,
                               self.spec.block, x.dtype)
            if bias is not None:
                y += bias
        else:   # W8A16 at decode M, W8A8 (fused quantization + _scaled_mm) above: fp8_gemm
            y = fp8_rowwise_linear(x2, layer.weight, layer.fp8_row_scales, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Fp8OnlineMethod(Fp8Method):
    """``LLM(quantization="fp8")`` on an unquantized checkpoint: the weight loads in the
    compute dtype and is quantized per output channel once loaded."""

    def create_weights(self, layer: nn.Module) -> None:
        add_param(layer, "weight", (layer.output_size, layer.input_size), layer.params_dtype,
                  WEIGHT)

    dummy_weights = QuantMethod.dummy_weights   # a plain weight in the compute dtype

    def process_after_loading(self, layer: nn.Module) -> None:
        amax = layer.weight.float().abs().amax(dim=1)
        tp = getattr(layer, "tp", None)
        if getattr(layer, "splits_input", False) and tp is not None and tp.size > 1:
            # a row-parallel rank holds part of each row: scale by the whole row, as TP=1 does
            torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=tp.group)
        weight, scales = ref.quantize_fp8_rows(layer.weight, amax)
        # Keep the quantized form in the checkpoint layout (on the weight's device), then take
        # the checkpoint path.
        layer._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        layer.register_parameter(self.scale_name,
                                 nn.Parameter(scales.reshape(-1, 1), requires_grad=False))
        layer.shardings[self.scale_name] = ParamSharding(out_dim=0, in_dim=None)
        super().process_after_loading(layer)
