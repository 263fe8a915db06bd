"""Attention over the paged KV cache, behind one backend interface.

Models build an ``Attention`` layer and call it as ``attn(q, k, v, kv_cache, meta)``; they
never call a backend or a kernel directly. The engine's ModelRunner builds one
``AttentionMetadata`` per step and passes it down through ``model.forward`` explicitly (no
module-global context). The cache and batch layout are the ones in the docstring of
``hpcinfer.kernels.reference``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hpcinfer.kernels import reference

# (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's flattened batch, built by the engine's ModelRunner; read-only for models."""
    slot_mapping: torch.Tensor   # [num_tokens] int64; -1 = padding, do not write
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor       # [num_seqs] int32, length after this step's tokens
    block_tables: torch.Tensor   # [num_seqs, max_blocks_per_seq] int32 (padded with 0)
    max_seqlen_q: int
    max_seqlen_k: int
    is_decode: bool              # every sequence has exactly one query token this step
    decode_split: DecodeSplit | None = None   # mixed steps: see DecodeSplit


@dataclass(frozen=True)
class DecodeSplit:
    """A mixed step's attention in two launches (backends may ignore it; torch_ref does).

    The leading ``num_decodes`` sequences have one query token each and go through the
    decode kernel (one program per KV head reads each context once); the rest through the
    varlen prefill kernel, which serves one query head per program and would read a decode
    row's whole context once per query head (4x for Llama-3's GQA). The linear layers still
    see the whole step, so the weights are read once. Index tensors are separate uploads, so
    each starts 16-byte aligned (Triton compiles a variant per pointer alignment)."""
    num_decodes: int
    decode_seq_lens: torch.Tensor        # [num_decodes] int32
    decode_block_tables: torch.Tensor    # [num_decodes, width] int32
    decode_max_seqlen_k: int             # the decode graphs' capacity: same kernel variant
    prefill_cu_seqlens_q: torch.Tensor   # [num_seqs - num_decodes + 1] int32, from 0
    prefill_seq_lens: torch.Tensor       # [num_seqs - num_decodes] int32
    prefill_block_tables: torch.Tensor   # [num_seqs - num_decodes, width] int32


class AttentionBackend(Protocol):
    """Writes this step's k/v into the cache by ``meta.slot_mapping``, then attends.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim].
    """
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, *,
                scale: float, sliding_window: int | None = None,
                causal: bool = True) -> torch.Tensor: ...


class TorchRefAttentionBackend:
    """The torch reference (``kernels/reference.py``): CPU, tests, the oracle for Triton."""
    name = "torch_ref"

    def forward(self, q, k, v, k_cache, v_cache, meta, *, scale, sliding_window=None,
                causal=True):
        if k_cache is None or k_cache.numel() == 0:
            # No cache yet (memory profiling, pooling tasks): plain varlen attention over this
            # step's own keys, which must then be the whole sequences.
            return _varlen_attention(q, k, v, meta, scale, sliding_window, causal)
        reference.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return reference.paged_decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                    meta.seq_lens, scale,
                                                    sliding_window=sliding_window)
        return reference.paged_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                         meta.block_tables, scale, causal=causal,
                                         sliding_window=sliding_window)


def _varlen_attention(q, k, v, meta: AttentionMetadata, scale: float,
                      sliding_window: int | None, causal: bool) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = meta.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi - lo != seq_len:
            raise ValueError("attention without a KV cache needs whole sequences in the step "
                             f"(sequence {i}: {hi - lo} query tokens, length {seq_len})")
        pos = torch.arange(seq_len, device=q.device)
        mask = (pos[None, :] <= pos[:, None]) if causal else torch.ones(
            seq_len, seq_len, dtype=torch.bool, device=q.device)
        if sliding_window is not None:
            mask &= pos[None, :] > pos[:, None] - sliding_window
        group = q.shape[1] // k.shape[1]
        qh = q[lo:hi].float().transpose(0, 1)                                  # [H, L, D]
        kh = k[lo:hi].float().transpose(0, 1).repeat_interleave(group, dim=0)  # [H, L, D]
        vh = v[lo:hi].float().transpose(0, 1).repeat_interleave(group, dim=0)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(out.dtype)
    return out


BACKEND_NAMES = ("auto", "torch_ref", "triton")


def get_attention_backend(name: str = "auto", device: torch.device | str | None = None
                          ) -> AttentionBackend:
    """``"torch_ref"``, ``"triton"`` (imported lazily) or ``"auto"``: triton on CUDA, else
    torch_ref."""
    if name == "auto":
        is_cuda = device is not None and torch.device(device).type == "cuda"
        name = "triton" if is_cuda else "torch_ref"
    if name == "torch_ref":
        return TorchRefAttentionBackend()
    if name == "triton":
        from hpcinfer.layers.attention_triton import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_NAMES)}")


class Attention(nn.Module):
    """Paged attention for one layer: holds the backend, scale and sliding window.

    ``forward(q, k, v, kv_cache, meta)``: q [T, num_heads, head_dim], k/v [T, num_kv_heads,
    head_dim], kv_cache = (k_cache, v_cache) of this layer -> [T, num_heads * head_dim].
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 backend: AttentionBackend, sliding_window: int | None = None,
                 causal: bool = True):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.causal = scale, sliding_window, causal
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, scale=self.scale,
                                   sliding_window=self.sliding_window, causal=self.causal)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim},"
                f" sliding_window={self.sliding_window}, backend={self.backend.name}")
