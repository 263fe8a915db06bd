"""The triton attention backend against torch_ref through the AttentionBackend interface.

A short engine-like schedule: a chunked prefill (second chunk starts mid-sequence), then
decode steps, each backend writing its own copy of the cache; outputs and caches must agree.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels.random_batch import make_paged_batch
from hpcinfer.layers.attention import (AttentionMetadata, AttentionSpec,
                                       TorchRefAttentionBackend,
                                       get_attention_backend)
from hpcinfer.layers.attention_triton import TritonAttentionBackend

TOL = dict(atol=2e-5, rtol=1e-4)


def _meta(b, is_decode: bool) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=b.slot_mapping, cu_seqlens_q=b.cu_seqlens_q,
                             seq_lens=b.seq_lens, block_tables=b.block_tables,
                             max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k,
                             is_decode=is_decode)


def test_auto_picks_torch_ref_on_cpu_and_triton_by_name():
    assert get_attention_backend("auto", "cpu").name == "torch_ref"
    assert isinstance(get_attention_backend("triton"), TritonAttentionBackend)


@pytest.mark.parametrize("sliding_window", [None, 12])
def test_triton_backend_matches_torch_ref_over_steps(sliding_window):
    heads, kv_heads, head_dim = 8, 2, 64
    triton_backend, ref_backend = TritonAttentionBackend(), TorchRefAttentionBackend()
    # Step 1 prefill chunks (one sequence mid-prompt), step 2 decodes on a fresh schedule;
    # make_paged_batch lays out the cache as the block manager would.
    steps = [([20, 33, 16], [20, 17, 16], False), ([21, 34, 17], [1, 1, 1], True)]
    for seed, (seq_lens, q_lens, is_decode) in enumerate(steps):
        b = make_paged_batch(seq_lens, q_lens, num_heads=heads, num_kv_heads=kv_heads,
                             head_dim=head_dim, block_size=16, dtype=torch.float32, seed=seed)
        caches = {name: (b.k_cache.clone(), b.v_cache.clone()) for name in ("triton", "ref")}
        meta = _meta(b, is_decode)
        outs = {}
        for name, backend in (("triton", triton_backend), ("ref", ref_backend)):
            outs[name] = backend.forward(b.q, b.k, b.v, *caches[name], meta,
                                         AttentionSpec(0.125, sliding_window=sliding_window))
        torch.testing.assert_close(outs["triton"], outs["ref"], **TOL)
        for got, expected in zip(caches["triton"], caches["ref"]):
            assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


@pytest.mark.parametrize("causal", [True, False])
def test_triton_backend_without_cache_matches_torch_ref(causal):
    # No KV cache (profiling run, pooling): whole sequences attend to their own tokens.
    b = make_paged_batch([5, 19, 1], [5, 19, 1], num_heads=4, num_kv_heads=4, head_dim=80,
                         block_size=16, dtype=torch.float32, seed=3)
    meta = _meta(b, is_decode=False)
    spec = AttentionSpec(0.3, causal=causal)
    got = TritonAttentionBackend().forward(b.q, b.k, b.v, None, None, meta, spec)
    expected = TorchRefAttentionBackend().forward(b.q, b.k, b.v, None, None, meta, spec)
    torch.testing.assert_close(got, expected, **TOL)
