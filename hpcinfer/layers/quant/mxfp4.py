"""MXFP4 MoE experts (gpt-oss's released checkpoints), dequantized to the model dtype at load.

There is no MXFP4 kernel: each expert projection is turned back into the unquantized stacked
layout (``[E, in, out]``, gate and up interleaved, as a bf16 gpt-oss checkpoint stores it) and
handed to the experts' own stacked loader (``StackedExpertWeight._load_stacked``), which slices
it for tensor or expert parallelism exactly as it does a bf16 tensor. Dequantization is one
expert at a time, so a tensor-parallel rank reads (lazily) and dequantizes only its experts
and never holds a whole layer in the run dtype.

The format (transformers' ``Mxfp4Config``, OpenAI's gpt-oss release):

- ``<layer>.mlp.experts.{gate_up_proj,down_proj}_blocks``: uint8 ``[E, out, in / 32, 16]``,
  two FP4 (e2m1) codes per byte, the low nibble holding the even element;
- ``..._scales``: uint8 ``[E, out, in / 32]``, one e8m0 exponent per 32 values (bias 127):
  value = e2m1(code) * 2 ** (scale - 127);
- dequantized, the rows are [E, out, in]; transposed they are the checkpoint's [E, in, out]
  (gate_up: out = 2 * intermediate with gate and up interleaved; down: out = hidden);
- biases, attention, router, embeddings and head are unquantized
  (``modules_to_not_convert``).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from hpcinfer.layers.quant.config import (MXFP4_BLOCK, QuantConfigError, QuantSpec,
                                          missing_tensor_problem, mxfp4_block_shape_problem)

log = logging.getLogger(__name__)

# e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
BYTES_PER_BLOCK = MXFP4_BLOCK // 2

_EXPERT_TENSOR = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)_(blocks|scales)$")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``blocks`` uint8 [..., G, 16] and ``scales`` uint8 [..., G] -> [..., G * 32] in
    ``dtype`` (computed in fp32: every MXFP4 value is exact there and in bf16)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, found {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales "
                         f"{tuple(scales.shape)} do not pair up: blocks must be "
                         f"[..., G, {BYTES_PER_BLOCK}] and scales [..., G]")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()   # low nibble first
    values = lut[codes].reshape(*blocks.shape[:-1], MXFP4_BLOCK)
    exponent = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK).to(dtype)


def _read(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.materialize()


class DequantizedExperts:
    """A lazy ``[E, in, out]`` view of one MXFP4 expert projection: ``narrow`` along the
    experts keeps it lazy, ``materialize`` reads (the checkpoint's tensors may be lazy slices,
    hpcinfer.distributed.slices) and dequantizes only those experts."""

    def __init__(self, blocks, scales):
        self.blocks, self.scales = blocks, scales
        experts, rows, groups, _ = blocks.shape
        self.shape = torch.Size((experts, groups * MXFP4_BLOCK, rows))

    def narrow(self, dim: int, start: int, length: int) -> DequantizedExperts:
        if dim != 0:
            raise ValueError("MXFP4 experts are sliced along the experts only, then "
                             "dequantized")
        return DequantizedExperts(self.blocks.narrow(0, start, length),
                                  self.scales.narrow(0, start, length))

    def materialize(self) -> torch.Tensor:
        rows = dequantize_mxfp4(_read(self.blocks), _read(self.scales))   # [E, out, in]
        return rows.transpose(1, 2)


class Mxfp4ExpertLoader:
    """Replaces one ``StackedExpertWeight``'s ``weight_loader``: the ``weight`` parameter
    receives the projection's blocks and scales (in either order); once both are in they go
    to the layer's stacked loader as a DequantizedExperts. Biases load as before."""

    def __init__(self, layer: nn.Module, name: str):
        self.layer, self.name = layer, name
        self.original = layer.weight_loader
        self.pending: dict[str, object] = {}

    def __call__(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param is not self.layer.weight:
            self.original(param, loaded, shard_id)
            return
        kind = "blocks" if loaded.dim() == 4 else "scales"
        if loaded.dtype != torch.uint8 or kind in self.pending:
            raise ValueError(f"quantization mxfp4: {self.name} received a {loaded.dtype} "
                             f"tensor of shape {list(loaded.shape)} where uint8 "
                             "_blocks/_scales were expected")
        self.pending[kind] = loaded
        if len(self.pending) < 2:
            return
        blocks, scales = self.pending.pop("blocks"), self.pending.pop("scales")
        layer = self.layer
        out_features = 2 * layer.full_inter if layer.kind == "gate_up" else param.shape[1]
        in_features = param.shape[2] if layer.kind == "gate_up" else layer.full_inter
        problem = mxfp4_block_shape_problem(self.name, blocks.shape, scales.shape,
                                            layer.num_experts, out_features, in_features)
        if problem is not None:
            raise QuantConfigError(problem)
        self.original(param, DequantizedExperts(blocks, scales))


def _mxfp4_checkpoint_name(original):
    def rename(name: str) -> str:
        # ..experts.gate_up_proj_blocks / _scales -> ..experts.gate_up_proj.weight
        return _EXPERT_TENSOR.sub(r".mlp.experts.\1.weight", original(name))
    return rename


def apply_mxfp4(model: nn.Module, spec: QuantSpec, checkpoint_names: list[str] | None) -> int:
    """Make ``model``'s stacked gpt-oss experts load MXFP4 blocks + scales (dequantized);
    QuantConfigError for a model without them or a checkpoint that lacks a tensor, before any
    weight is read. Returns the number of expert projections."""
    from hpcinfer.layers.moe import StackedExpertWeight
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, StackedExpertWeight) and m.stacked_format == "gpt_oss"]
    if not layers:
        raise QuantConfigError(
            f"quantization mxfp4: only gpt-oss's stacked MoE experts load from MXFP4 "
            f"(dequantized at load); {type(model).__name__} has none")
    if checkpoint_names is not None:
        problem = missing_tensor_problem(spec, checkpoint_names)
        if problem is not None:
            raise QuantConfigError(problem)
        plain = [n for n in checkpoint_names
                 if re.search(r"\.mlp\.experts\.(gate_up_proj|down_proj)$", n)]
        if plain:
            raise QuantConfigError(f"quantization mxfp4: the checkpoint holds unquantized "
                                   f"{plain[0]} beside its MXFP4 blocks: it is mixed up")
    for name, layer in layers:
        layer.weight_loader = Mxfp4ExpertLoader(layer, name)
    model.checkpoint_name = _mxfp4_checkpoint_name(
        getattr(model, "checkpoint_name", None) or (lambda n: n))
    log.info("quantization %s: %d expert projections", spec.describe(), len(layers))
    return len(layers)


def check_mxfp4_loaded(model: nn.Module) -> None:
    """After loading: no projection may be left with blocks but no scales (or the reverse)."""
    for module in model.modules():
        loader = getattr(module, "weight_loader", None)
        if isinstance(loader, Mxfp4ExpertLoader) and loader.pending:
            raise ValueError(f"quantization mxfp4: {loader.name} got only its "
                             f"{next(iter(loader.pending))}")
