"""vLLM config objects that scripts build and pass to ``LLM`` (``from vllm.config import
AttentionConfig``). They carry the script's choice into the engine arguments, where
hpcinfer.engine.vllm_args says what it does here (``attention_config``: logged and ignored)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AttentionConfig:
    """vLLM's attention settings; ``backend`` is an AttentionBackendEnum or its name."""

    backend: Any = None
    flash_attn_version: int | None = None
    use_prefill_decode_attention: bool = False
