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
from torch import nn

from hpcinfer.kernels import reference
from hpcinfer.layers.linear import (NO_TP, TensorParallel, WeightShapeError,
                                    copy_checked)

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
    # [num_tokens] int32: the last key position each query may see, for layers whose spec has
    # ``bidirectional_spans`` (Gemma 3: an image token sees its whole placeholder span, a
    # text token its own position). None: every query sees up to its own position.
    last_key_positions: torch.Tensor | None = None
    # Decode steps: every sequence's first ``shared_prefix_len`` keys are the same cached
    # blocks (``block_tables[0]``'s first ones; engine/shared_prefix.py). Backends may attend
    # them once for all rows; 0 = no such prefix, or not worth it.
    shared_prefix_len: int = 0


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
    # The decode rows' first keys that they all share (AttentionMetadata.shared_prefix_len)
    shared_prefix_len: int = 0


@dataclass(frozen=True)
class AttentionSpec:
    """What one layer's attention computes; models fill it, every backend implements it.

    Logits are ``q.k * scale``; then, in this order: ``logit_softcap`` (Gemma 2:
    ``cap * tanh(logits / cap)``), the causal and ``sliding_window`` masks (Mistral: a query at
    position p sees keys at positions > p - window), and the softmax, whose denominator with
    ``has_sinks`` (gpt-oss) also holds ``exp(sink)`` for one learned logit per query head that
    carries no value. Layers of one model may differ (Gemma 2 alternates windows), so the
    spec is per layer, never per model.

    ``bidirectional_spans`` (Gemma 3 with images): the causal limit of each query is
    ``meta.last_key_positions`` when the step has it, so the tokens of one image placeholder
    span see each other both ways while text stays causal; the window still counts back from
    the query's own position (transformers: ``(causal or same image) and inside the window``).
    The scheduler never ends a chunk inside such a span (a query's keys are all in the cache
    or in its step).
    """
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None
    causal: bool = True
    has_sinks: bool = False
    bidirectional_spans: bool = False

    def __post_init__(self):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1, or None for "
                             "full attention")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be > 0, or None for no "
                             "capping (some configs write 0.0 for none: map that to None)")
        if self.bidirectional_spans and not self.causal:
            raise ValueError("bidirectional_spans widens a causal mask; a layer with "
                             "causal=False sees every key already: leave it False")

    def key_limits(self, meta: AttentionMetadata) -> torch.Tensor | None:
        """The per-query last key positions this layer honours (None: causal as usual)."""
        return meta.last_key_positions if self.bidirectional_spans else None


class AttentionBackend(Protocol):
    """Writes this step's k/v into the cache by ``meta.slot_mapping``, then attends.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim].
    ``sinks``: [num_heads] (this rank's heads), given exactly when ``spec.has_sinks``.
    """
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                spec: AttentionSpec, sinks: torch.Tensor | None = None) -> torch.Tensor: ...


def check_sinks(spec: AttentionSpec, sinks: torch.Tensor | None, num_heads: int) -> None:
    """Backends call this first: a spec and a sinks tensor that disagree are a caller bug."""
    if spec.has_sinks != (sinks is not None):
        raise ValueError(f"spec.has_sinks={spec.has_sinks} but sinks is "
                         f"{'given' if sinks is not None else 'None'}: pass the layer's sinks "
                         "tensor exactly when the spec has sinks")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        raise ValueError(f"sinks must be [num_heads] = [{num_heads}] (this rank's query "
                         f"heads), got {tuple(sinks.shape)}")


class TorchRefAttentionBackend:
    """The torch reference (``kernels/reference.py``): CPU, tests, the oracle for Triton."""
    name = "torch_ref"

    def forward(self, q, k, v, k_cache, v_cache, meta, spec: AttentionSpec, sinks=None):
        check_sinks(spec, sinks, q.shape[1])
        features = dict(sliding_window=spec.sliding_window, logit_softcap=spec.logit_softcap,
                        sinks=sinks)
        key_limits = spec.key_limits(meta)
        if k_cache is None or k_cache.numel() == 0:
            # No cache yet (memory profiling, pooling tasks): plain varlen attention over this
            # step's own keys, which must then be the whole sequences.
            return _varlen_attention(q, k, v, meta, spec, sinks)
        reference.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode and spec.causal and key_limits is None:
            return reference.paged_decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                    meta.seq_lens, spec.scale, **features)
        return reference.paged_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                         meta.block_tables, spec.scale, causal=spec.causal,
                                         last_key_positions=key_limits, **features)


def _varlen_attention(q, k, v, meta: AttentionMetadata, spec: AttentionSpec,
                      sinks: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = meta.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi - lo != seq_len:
            raise ValueError("attention without a KV cache needs whole sequences in the step "
                             f"(sequence {i}: {hi - lo} query tokens, length {seq_len})")
        limits = spec.key_limits(meta)
        mask = reference.attention_mask(seq_len, seq_len, spec.causal, spec.sliding_window,
                                        q.device, None if limits is None else limits[lo:hi])
        o = reference.attend(q[lo:hi], k[lo:hi], v[lo:hi], mask, spec.scale,
                             logit_softcap=spec.logit_softcap, sinks=sinks)
        out[lo:hi] = o.to(out.dtype)
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
    """Paged attention for one layer: holds the backend and the layer's ``AttentionSpec``.

    ``forward(q, k, v, kv_cache, meta)``: q [T, num_heads, head_dim], k/v [T, num_kv_heads,
    head_dim], kv_cache = (k_cache, v_cache) of this layer -> [T, num_heads * head_dim].
    num_heads and num_kv_heads are this tensor-parallel rank's. With ``has_sinks`` the layer
    owns ``sinks`` ([num_heads], in the model dtype, loaded by ``weight_loader``, which takes
    this rank's heads from the checkpoint's [total_heads] tensor; ``tp`` says which rank).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 backend: AttentionBackend, sliding_window: int | None = None,
                 causal: bool = True, logit_softcap: float | None = None,
                 has_sinks: bool = False, bidirectional_spans: bool = False,
                 tp: TensorParallel = NO_TP):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.spec = AttentionSpec(scale=scale, sliding_window=sliding_window,
                                  logit_softcap=logit_softcap, causal=causal,
                                  has_sinks=has_sinks, bidirectional_spans=bidirectional_spans)
        self.backend, self.tp = backend, tp
        self.sinks = (nn.Parameter(torch.empty(num_heads), requires_grad=False)
                      if has_sinks else None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """The sinks: this rank's contiguous ``num_heads`` of the checkpoint's [total_heads]
        (query heads are split across ranks in order, as QKVParallelLinear splits them)."""
        full = self.num_heads * self.tp.size
        if tuple(loaded_weight.shape) != (full,):
            raise WeightShapeError((full,), tuple(loaded_weight.shape))
        with torch.no_grad():
            copy_checked(param.data, loaded_weight.narrow(0, self.tp.rank * self.num_heads,
                                                          self.num_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache | None, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.spec, self.sinks)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim},"
                f" {self.spec}, backend={self.backend.name}")
