"""What the engine needs to know about a loaded model, as one frozen record."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSpec:
    """Sizes the KV cache and tells the engine when to stop.

    ``num_kv_heads`` and ``num_heads`` are per tensor-parallel rank (what one rank's cache
    holds). ``sliding_window`` is set only when *every* layer attends within that window (so
    blocks older than it may be dropped); otherwise None. ``eos_token_ids`` joins the config's
    ``eos_token_id`` with the checkpoint's generation_config.json (Llama-3 instruct lists
    several there). ``max_position_embeddings`` is the longest sequence the rope covers
    (``layers.rotary.max_position_of``: the config's value, extended by yarn and dynamic
    scaling, whose configs keep the pretraining length there).
    """
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


def head_dim_of(config: Any) -> int:
    """An explicit ``head_dim`` (Gemma, Qwen3) wins over hidden_size // num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF ``eos_token_id`` (None, int or list) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
