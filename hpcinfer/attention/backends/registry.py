"""``AttentionBackendEnum``: vLLM's backend names, accepted so that scripts which pick one
(``AttentionConfig(backend=AttentionBackendEnum.FLEX_ATTENTION)``) run unchanged. hpcinfer has
one attention implementation per device (Triton kernels on CUDA, torch on CPU), so the choice
is logged and ignored (hpcinfer.engine.vllm_args: ``attention_config``)."""
from __future__ import annotations

import enum


class AttentionBackendEnum(enum.Enum):
    FLASH_ATTN = "FLASH_ATTN"
    TRITON_ATTN = "TRITON_ATTN"
    FLASHINFER = "FLASHINFER"
    FLEX_ATTENTION = "FLEX_ATTENTION"
    TORCH_SDPA = "TORCH_SDPA"
    ROCM_ATTN = "ROCM_ATTN"
    ROCM_AITER_FA = "ROCM_AITER_FA"
    CPU_ATTN = "CPU_ATTN"
    TREE_ATTN = "TREE_ATTN"
    XFORMERS = "XFORMERS"
