"""An adapter's tensors, checked against the model's LoRA layers before anything is loaded.

``AdapterWeights`` holds the full HF tensors on the CPU (B already times the scaling), keyed
by the HF module path; ``LoRALayer.load`` keeps this rank's slice when it goes into a slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hpcinfer.lora.adapter_config import (WEIGHTS_FILE, AdapterConfig, AdapterError, check_rank,
                                          parse_key, read_adapter_config)
from hpcinfer.lora.layers import LoRALayer


@dataclass
class AdapterWeights:
    config: AdapterConfig
    # HF module path -> (A [r, in], B [out, r] * scaling), fp32 on the CPU
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_adapter(request, targets: dict[str, tuple[LoRALayer, object]],
                 max_lora_rank: int) -> AdapterWeights:
    """Read ``request``'s adapter (a LoRARequest) and check it fits the model: AdapterError
    (a ValueError) otherwise, saying what to do."""
    label = request.lora_name
    config = read_adapter_config(request.lora_path, label)
    check_rank(config, max_lora_rank, label)
    check_targets(config, targets, label)
    from safetensors.torch import load_file
    tensors = load_file(str(Path(config.path) / WEIGHTS_FILE))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, ab = parse_key(key)
        parts.setdefault(module, {})[ab] = tensor.float()
    modules = {m: (p["A"], p["B"] * config.scaling) for m, p in parts.items()}
    return AdapterWeights(config, modules)


def check_targets(config: AdapterConfig, targets: dict[str, tuple[LoRALayer, object]],
                  label: str) -> None:
    """Every module the adapter targets exists in this model with the adapter's sizes."""
    for module, (a_shape, b_shape) in config.modules.items():
        if module not in targets:
            example = next(iter(targets), "none")
            raise AdapterError(
                f"LoRA adapter {label!r} targets {module}, which this model does not have (its "
                f"LoRA targets are named like {example}): the adapter was trained for another "
                f"base model (adapter_config.json: base_model_name_or_path="
                f"{config.base_model!r}); use an adapter of this model")
        lora_layer, piece = targets[module]
        full_in, full_out = lora_layer.full_shapes(piece)
        if (a_shape[1], b_shape[0]) != (full_in, full_out):
            raise AdapterError(
                f"LoRA adapter {label!r}: {module} maps {a_shape[1]} -> {b_shape[0]} features "
                f"but this model's maps {full_in} -> {full_out}: the adapter was trained for "
                f"another base model (base_model_name_or_path={config.base_model!r}); use an "
                "adapter of this model")
