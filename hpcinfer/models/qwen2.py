"""Qwen2: Llama with biases on q/k/v and optional sliding-window layers."""
from __future__ import annotations

from typing import Any

from hpcinfer.models.llama import LlamaForCausalLM


def qwen_sliding_window_for(config: Any, layer_idx: int) -> int | None:
    """Qwen2/3 mark sliding layers in ``layer_types`` (transformers 5) or, in older configs,
    by ``use_sliding_window`` and ``max_window_layers``."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window if layer_idx >= config.max_window_layers else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return qwen_sliding_window_for(config, layer_idx)
