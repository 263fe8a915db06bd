"""The per-layer attention spec (softcap, sinks, windows): the torch reference against a dense
formula written here, the Attention layer's spec and sinks, then the Triton kernels against
the reference (interpreted, tiny sizes).

Unused cache slots are NaN (random_batch), so a kernel that reads a key outside the window or
past a sequence's end fails the comparison instead of passing by luck.
"""
from __future__ import annotations

import math

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.random_batch import make_paged_batch
from hpcinfer.layers.attention import (Attention, AttentionMetadata, AttentionSpec,
                                       TorchRefAttentionBackend)
from hpcinfer.layers.linear import TensorParallel, WeightShapeError


def dense_attention(q, k, v, q_positions, scale, *, causal=True, window=None, softcap=None,
                    sinks=None):
    """The textbook formula, one query and head at a time, in float64.

    q: [q_len, H, D] at absolute q_positions; k, v: [kv_len, KVH, D] at positions 0..kv_len-1.
    weight_j = exp(l_j) / (sum_visible exp(l_i) + exp(sink)), l = softcap(scale * q.k).
    """
    q_len, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(q_len, heads, v.shape[2], dtype=torch.float64)
    for i in range(q_len):
        p = q_positions[i]
        visible = [j for j in range(k.shape[0])
                   if (not causal or j <= p) and (window is None or j > p - window)]
        for h in range(heads):
            logits = [scale * float(q[i, h].double() @ k[j, h // group].double()) for j in visible]
            if softcap is not None:
                logits = [softcap * math.tanh(x / softcap) for x in logits]
            denom = sum(math.exp(x) for x in logits)
            if sinks is not None:
                denom += math.exp(float(sinks[h]))
            for x, j in zip(logits, visible):
                out[i, h] += math.exp(x) / denom * v[j, h // group].double()
    return out


def _paged_reference(b, scale, **features):
    return reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                     b.block_tables, scale, **features)


@pytest.mark.parametrize("features", [
    dict(logit_softcap=2.0),
    dict(sinks=True),
    dict(logit_softcap=1.5, sinks=True, sliding_window=5),
    dict(causal=False, sinks=True),
])
def test_reference_matches_dense_formula(features):
    # Sequence 0 is a prefill chunk that starts mid-sequence (a prefix-cache hit); sequence 1
    # a whole prompt; sequence 2 a decode. GQA 6 query heads on 2 KV heads, block_size 4.
    seq_lens, q_lens = [11, 6, 9], [4, 6, 1]
    b = make_paged_batch(seq_lens, q_lens, num_heads=6, num_kv_heads=2, head_dim=8,
                         block_size=4, dtype=torch.float32, seed=7)
    reference.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    features = dict(features)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -4.0]) if features.pop("sinks", False) else None
    # Logits of this scale reach ~+-10, so a softcap of 1.5..2 changes them a lot.
    scale = 1.0
    got = _paged_reference(b, scale, sinks=sinks, **features)
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        lo, hi = b.cu_seqlens_q[i].item(), b.cu_seqlens_q[i + 1].item()
        k = reference.gather_kv(b.k_cache, b.block_tables[i], seq_len)
        v = reference.gather_kv(b.v_cache, b.block_tables[i], seq_len)
        expected = dense_attention(b.q[lo:hi], k, v, list(range(seq_len - q_len, seq_len)), scale,
                                   causal=features.get("causal", True),
                                   window=features.get("sliding_window"),
                                   softcap=features.get("logit_softcap"), sinks=sinks)
        torch.testing.assert_close(got[lo:hi].double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_sinks_follow_transformers_gpt_oss():
    # transformers' GptOss eager_attention_forward, written out: concat the sink column to the
    # scaled logits, subtract the row max, softmax, drop the column.
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 4, 8, generator=gen) for _ in range(3))
    sinks = torch.randn(4, generator=gen) * 3
    mask = reference.attention_mask(5, 5, True, None, "cpu")
    logits = torch.einsum("qhd,khd->hqk", q, k) * 0.3 + torch.where(mask, 0.0, float("-inf"))
    combined = torch.cat([logits, sinks[:, None, None].expand(-1, 5, 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]
    expected = torch.einsum("hqk,khd->qhd", probs, v)
    got = reference.attend(q, k, v, mask, 0.3, sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_reference_row_without_keys_gives_zeros_with_sinks():
    # Only the sink is visible: every weight is 0 (no NaN from an empty softmax).
    q, k, v = torch.randn(1, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    got = reference.attend(q, k, v, mask, 1.0, sinks=torch.zeros(2))
    assert torch.equal(got, torch.zeros_like(got))


def test_spec_rejects_meaningless_values():
    with pytest.raises(ValueError, match="sliding_window=0"):
        AttentionSpec(1.0, sliding_window=0)
    with pytest.raises(ValueError, match="map that to None"):
        AttentionSpec(1.0, logit_softcap=0.0)


def _one_prompt_meta(seq_len: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.arange(seq_len), cu_seqlens_q=torch.tensor([0, seq_len],
                                                                       dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.arange(-(-seq_len // 4), dtype=torch.int32)[None],
        max_seqlen_q=seq_len, max_seqlen_k=seq_len, is_decode=False)


def test_attention_layer_builds_the_spec_and_loads_its_rank_of_sinks():
    backend = TorchRefAttentionBackend()
    plain = Attention(4, 2, 8, 0.25, backend=backend)
    assert plain.spec == AttentionSpec(0.25) and plain.sinks is None
    assert dict(plain.named_parameters()) == {}
    # TP rank 1 of 2: query heads 4..7 of 8, so sinks[4:8] of the checkpoint tensor.
    attn = Attention(4, 2, 8, 0.25, backend=backend, sliding_window=3, logit_softcap=30.0,
                     has_sinks=True, tp=TensorParallel(rank=1, size=2))
    assert attn.spec == AttentionSpec(0.25, sliding_window=3, logit_softcap=30.0,
                                      has_sinks=True)
    full = torch.arange(8, dtype=torch.float32)
    attn.weight_loader(attn.sinks, full)
    assert torch.equal(attn.sinks.data, full[4:])
    with pytest.raises(WeightShapeError):
        attn.weight_loader(attn.sinks, full[:6])

    # The layer hands spec and sinks to the backend: with and without a cache, the same as
    # the reference called with the same features.
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 4, 8, generator=gen), *torch.randn(2, 6, 2, 8, generator=gen)
    meta = _one_prompt_meta(6)
    cache = (torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))
    with_cache = attn(q, k, v, cache, meta)
    without_cache = attn(q, k, v, None, meta)
    mask = reference.attention_mask(6, 6, True, 3, "cpu")
    expected = reference.attend(q, k, v, mask, 0.25, logit_softcap=30.0, sinks=full[4:])
    torch.testing.assert_close(with_cache, expected.reshape(6, 32))
    torch.testing.assert_close(without_cache, expected.reshape(6, 32))


def test_backend_refuses_a_spec_and_sinks_that_disagree():
    b = make_paged_batch([5], [5], num_heads=2, num_kv_heads=1, head_dim=4, block_size=4,
                         dtype=torch.float32)
    meta = _one_prompt_meta(5)
    with pytest.raises(ValueError, match="spec.has_sinks=True but sinks is None"):
        TorchRefAttentionBackend().forward(b.q, b.k, b.v, None, None, meta,
                                           AttentionSpec(1.0, has_sinks=True))
    with pytest.raises(ValueError, match=r"sinks must be \[num_heads\] = \[2\]"):
        TorchRefAttentionBackend().forward(b.q, b.k, b.v, None, None, meta,
                                           AttentionSpec(1.0, has_sinks=True), torch.zeros(3))
