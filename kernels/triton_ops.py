"""The Triton launchers under the reference's names: a drop-in for ``kernels.reference``.

``hpcinfer.layers.ops`` picks an ops module per tensor; on CUDA it can return this one, since
every launcher here takes the reference function's arguments (plus optional ``out=``).
The one difference callers see: ``rotary_embedding`` rotates q and k in place and returns
them, where the reference returns new tensors.
"""
from __future__ import annotations

from .activation import gelu_tanh_and_mul, silu_and_mul
from .cache import reshape_and_cache
from .decode_attention import paged_decode_attention
from .norm import rms_norm
from .prefill_attention import paged_attention
from .rotary import rotary_embedding

__all__ = ["gelu_tanh_and_mul", "silu_and_mul", "reshape_and_cache", "paged_decode_attention",
           "rms_norm", "paged_attention", "rotary_embedding"]
