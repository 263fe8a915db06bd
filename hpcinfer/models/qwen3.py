"""Qwen3: Llama with an RMSNorm over each head of q and k (before rope), no qkv bias."""
from __future__ import annotations

from typing import Any

from hpcinfer.models.llama import LlamaForCausalLM
from hpcinfer.models.qwen2 import qwen_sliding_window_for


class Qwen3ForCausalLM(LlamaForCausalLM):
    has_qk_norm = True

    @staticmethod
    def sliding_window_for(config: Any, layer_idx: int) -> int | None:
        return qwen_sliding_window_for(config, layer_idx)
