"""Gemma (1): Llama with embeddings scaled by sqrt(hidden_size) in the model dtype, GeGLU
(tanh) MLP, RMSNorm as ``x * (1 + w)`` computed in fp32, explicit head_dim, tied head."""
from __future__ import annotations

from hpcinfer.models.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    norm_offset = 1.0
    scales_embeddings = True
