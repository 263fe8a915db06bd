"""vLLM's ``vllm.v1.attention.backends.registry`` path for ``AttentionBackendEnum``."""
from hpcinfer.attention.backends.registry import AttentionBackendEnum

__all__ = ["AttentionBackendEnum"]
