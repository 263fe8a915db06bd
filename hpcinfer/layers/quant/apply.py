"""Swap quantization methods into a model built on the meta device, and finish them after
the weights load. Model files never see this: it walks their linear layers by name."""
from __future__ import annotations

import logging

import torch
from torch import nn

from hpcinfer.layers.linear import LinearBase
from hpcinfer.layers.quant.base import QuantMethod
from hpcinfer.layers.quant.config import (QuantConfigError, QuantSpec, is_quantized_layer,
                                          missing_tensor_problem, shape_problem)

log = logging.getLogger(__name__)

# Checkpoint tensors the engine does not use (yet): FP8 KV-cache and attention scales, and
# compressed-tensors' record of the unpacked shape (the config gives it).
UNUSED_SUFFIXES = (".k_scale", ".v_scale", ".q_scale", ".kv_scale", ".prob_scale",
                   ".weight_shape")


def method_for(spec: QuantSpec) -> QuantMethod:
    if spec.online:
        from hpcinfer.layers.quant.fp8 import Fp8OnlineMethod
        return Fp8OnlineMethod(spec)
    if spec.is_fp8:
        from hpcinfer.layers.quant.fp8 import Fp8Method
        return Fp8Method(spec)
    from hpcinfer.layers.quant.int4 import Int4Method
    return Int4Method(spec)


def hf_name_of(model: nn.Module, module_name: str, layer: LinearBase) -> str:
    """The HF module name of a (possibly merged) layer: its first piece's
    (``...qkv_proj`` -> ``...q_proj``)."""
    prefix, _, leaf = module_name.rpartition(".")
    for hf_part, (ours, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        if ours == leaf and shard_id == layer.shard_ids[0]:
            return f"{prefix}.{hf_part}"
    return module_name


def apply_quantization(model: nn.Module, spec: QuantSpec, dtype: torch.dtype,
                       checkpoint_names: list[str] | None, tp_size: int) -> int:
    """Give every quantized linear layer of ``model`` (on meta, already in ``dtype``) its
    method; raise QuantConfigError for a layer that does not fit or a checkpoint that lacks a
    tensor, before any weight is read. Returns the number of quantized layers.
    ``checkpoint_names`` None: no checkpoint (load_format="dummy"), nothing to check.
    MXFP4 (gpt-oss experts) quantizes no linear layer: its experts dequantize at load;
    neither does bitsandbytes: its weights are dequantized as the checkpoint is read."""
    if spec.is_mxfp4:
        from hpcinfer.layers.quant.mxfp4 import apply_mxfp4
        model.unused_checkpoint_suffixes = UNUSED_SUFFIXES
        return apply_mxfp4(model, spec, checkpoint_names)
    if not spec.online and checkpoint_names is not None:
        problem = missing_tensor_problem(spec, checkpoint_names)
        if problem is not None:
            raise QuantConfigError(problem)
    if spec.is_bnb:   # the layers stay unquantized: the checkpoint stream is dequantized
        from hpcinfer.layers.quant.bnb import BnbCheckpoint
        model.transform_checkpoint = BnbCheckpoint(model, spec)
        log.info("quantization %s", spec.describe())
        return 0
    method, count = method_for(spec), 0
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        if not is_quantized_layer(spec, hf_name_of(model, name, module)):
            continue
        leaf = name.rpartition(".")[2]
        problem = shape_problem(spec, leaf, module.out_pieces, module.input_size, tp_size)
        if problem is not None:
            raise QuantConfigError(f"quantization {spec.method}: {problem}")
        with torch.device("meta"):
            module.set_quant_method(method, dtype)
        count += 1
    model.unused_checkpoint_suffixes = UNUSED_SUFFIXES
    log.info("quantization %s: %d linear layers", spec.describe(), count)
    return count


def finish_quantization(model: nn.Module) -> None:
    """Let each layer's method turn its loaded tensors into their run-time form."""
    from hpcinfer.layers.quant.mxfp4 import check_mxfp4_loaded
    check_mxfp4_loaded(model)
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.process_after_loading()
