"""Gemma 3 (text; ``model_type`` gemma3_text): Gemma 2 with q/k norms and two ropes.

What differs from Gemma 2: an RMSNorm ``x * (1 + w)`` over each head of q and k before rope;
sliding layers use the local rope (``rope_local_base_freq``, transformers 5's
``rope_parameters["sliding_attention"]``), full layers the global one with its scaling
(``rope_parameters["full_attention"]``, e.g. linear factor 8); capping only where the config
sets it (released checkpoints do not).
"""
from __future__ import annotations

from typing import Any

from hpcinfer.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    has_qk_norm = True

    @staticmethod
    def rope_layer_type(config: Any, layer_idx: int) -> str | None:
        return config.layer_types[layer_idx]
