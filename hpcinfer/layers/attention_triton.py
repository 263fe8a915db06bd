"""The ``triton`` attention backend: our Triton kernels behind the AttentionBackend interface.

Per step: ``reshape_and_cache`` writes this step's keys/values into the paged cache, then the
decode kernel (``meta.is_decode``: one query per sequence, GQA-grouped, split-K, a prefix that
every row shares attended once: ``meta.shared_prefix_len``) or the varlen
prefill kernel (everything else, decodes mixed in) attends over the cache. Nothing here syncs
with the host, and the decode grid depends only on tensor shapes (the block table's width
bounds the context), so a CUDA graph captured for a batch size stays valid as sequences grow.
"""
from __future__ import annotations

import torch

from hpcinfer.kernels.cache import reshape_and_cache
from hpcinfer.kernels.decode_attention import paged_decode_attention
from hpcinfer.kernels.prefill_attention import paged_attention
from hpcinfer.layers.attention import AttentionMetadata, AttentionSpec, check_sinks


class TritonAttentionBackend:
    """Triton kernels from ``hpcinfer.kernels``; same results as ``torch_ref`` up to rounding."""
    name = "triton"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
                meta: AttentionMetadata, spec: AttentionSpec,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim]
        check_sinks(spec, sinks, q.shape[1])
        features = dict(sliding_window=spec.sliding_window, logit_softcap=spec.logit_softcap,
                        sinks=sinks)
        key_limits = spec.key_limits(meta)   # Gemma 3's image spans (steps with images only)
        if k_cache is None or k_cache.numel() == 0:
            return self._attend_without_cache(q, k, v, meta, spec,
                                              dict(features, last_key_positions=key_limits))
        reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode and spec.causal and key_limits is None:
            # The grid's bound is the block table's capacity, not meta.max_seqlen_k: that
            # keeps the launch identical between steps (CUDA-graph replay). A shared prefix
            # (eager steps only) is attended once for all rows, except by windowed layers.
            shared = meta.shared_prefix_len if spec.sliding_window is None else 0
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                          spec.scale, shared_prefix_len=shared, **features)
        split = meta.decode_split
        if split is not None and spec.causal:
            k = split.num_decodes
            out = torch.empty_like(q)
            paged_decode_attention(q[:k], k_cache, v_cache, split.decode_block_tables,
                                   split.decode_seq_lens, spec.scale, out=out[:k],
                                   max_seqlen_k=split.decode_max_seqlen_k,
                                   shared_prefix_len=(split.shared_prefix_len
                                                      if spec.sliding_window is None else 0),
                                   **features)
            # The decode rows come first, one token each: the prefill rows' limits follow.
            paged_attention(q[k:], k_cache, v_cache, split.prefill_cu_seqlens_q,
                            split.prefill_seq_lens, split.prefill_block_tables, spec.scale,
                            causal=True, out=out[k:], max_seqlen_q=meta.max_seqlen_q,
                            last_key_positions=None if key_limits is None else key_limits[k:],
                            **features)
            return out
        return paged_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                               meta.block_tables, spec.scale, causal=spec.causal,
                               max_seqlen_q=meta.max_seqlen_q, last_key_positions=key_limits,
                               **features)

    @staticmethod
    def _attend_without_cache(q, k, v, meta: AttentionMetadata, spec: AttentionSpec,
                              features: dict) -> torch.Tensor:
        """No KV cache (memory profiling, pooling): each sequence attends to its own tokens.

        This step's k/v act as a cache of block size 1 whose "block table" for sequence i is
        the token rows cu_seqlens_q[i] + j. As in torch_ref, the step must hold whole
        sequences (q_len_i == seq_lens[i]); unlike torch_ref this is not checked, since
        checking would sync with the host.
        """
        num_seqs = meta.seq_lens.shape[0]
        width = max(meta.max_seqlen_q, 1)
        rows = torch.arange(width, device=q.device, dtype=meta.cu_seqlens_q.dtype)
        block_tables = meta.cu_seqlens_q[:num_seqs, None] + rows[None, :]   # [num_seqs, width]
        if k.stride() != v.stride():   # the kernel addresses k and v with one set of strides
            k, v = k.contiguous(), v.contiguous()
        return paged_attention(q, k.unsqueeze(1), v.unsqueeze(1), meta.cu_seqlens_q,
                               meta.seq_lens, block_tables, spec.scale, causal=spec.causal,
                               max_seqlen_q=meta.max_seqlen_q, **features)
