"""Per-query key limits (Gemma 3's image spans: an image token sees the whole placeholder span
of its image, text stays causal): the torch reference against a dense formula written here,
then the Triton prefill kernel and the triton backend against the reference (interpreted).

Every check also runs the plain causal mask on the same batch and requires it to differ, so
a kernel or reference that ignored the limits would fail. Unused cache slots are NaN
(random_batch): reading a key past a sequence's end fails too.
"""
from __future__ import annotations

import math

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.prefill_attention import paged_attention
from hpcinfer.kernels.random_batch import make_paged_batch
from hpcinfer.layers.attention import (AttentionMetadata, AttentionSpec, DecodeSplit,
                                       TorchRefAttentionBackend)
from hpcinfer.layers.attention_triton import TritonAttentionBackend

TOL = dict(atol=2e-5, rtol=1e-4)
# (seq_len, q_len, spans as absolute [start, end)). Sequence 0: a chunk after a prefix-cache
# hit that starts inside a span (the hit ended mid-image); sequence 1: a whole 45-token
# prompt (more than one 32-query tile) with a span across the tile edge and one that ends
# the prompt; sequence 2: a decode after an image; sequence 3: text only.
LAYOUT = [(21, 9, [(10, 16)]), (45, 45, [(3, 11), (28, 37), (40, 45)]), (30, 1, [(5, 20)]),
          (12, 7, [])]


def key_limits(layout) -> torch.Tensor:
    """[num_tokens] int32: each query's last visible key (its span's last token, or itself)."""
    limits = []
    for seq_len, q_len, spans in layout:
        for pos in range(seq_len - q_len, seq_len):
            limits.append(next((end - 1 for start, end in spans if start <= pos < end), pos))
    return torch.tensor(limits, dtype=torch.int32)


def batch(layout, heads=4, kv_heads=2, seed=0):
    b = make_paged_batch([s for s, _, _ in layout], [q for _, q, _ in layout],
                         num_heads=heads, num_kv_heads=kv_heads, head_dim=16, block_size=4,
                         dtype=torch.float32, seed=seed)
    reference.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


def dense(q, k, v, q_positions, limits, scale, window=None, softcap=None):
    """Textbook attention in float64: query i sees key j when j <= limits[i] and, with a
    window, j > q_positions[i] - window (transformers' Gemma 3: (causal or same image) and
    inside the window)."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, (p, last) in enumerate(zip(q_positions, limits)):
        visible = [j for j in range(k.shape[0]) if j <= last and (window is None or j > p - window)]
        for h in range(q.shape[1]):
            logits = [scale * float(q[i, h].double() @ k[j, h // group].double()) for j in visible]
            if softcap is not None:
                logits = [softcap * math.tanh(x / softcap) for x in logits]
            weights = torch.tensor(logits, dtype=torch.float64).softmax(0)
            out[i, h] = sum(w * v[j, h // group].double() for w, j in zip(weights, visible))
    return out


def _reference(b, limits, **features):
    return reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                     b.block_tables, 0.5, last_key_positions=limits, **features)


def _differs(a, b):
    return not torch.allclose(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("features", [{}, dict(sliding_window=5, logit_softcap=2.0)])
def test_reference_matches_dense_formula(features):
    b, limits = batch(LAYOUT, seed=1), key_limits(LAYOUT)
    got = _reference(b, limits, **features)
    for i, (seq_len, q_len, _) in enumerate(LAYOUT):
        lo, hi = b.cu_seqlens_q[i].item(), b.cu_seqlens_q[i + 1].item()
        k = reference.gather_kv(b.k_cache, b.block_tables[i], seq_len)
        v = reference.gather_kv(b.v_cache, b.block_tables[i], seq_len)
        expected = dense(b.q[lo:hi], k, v, range(seq_len - q_len, seq_len), limits[lo:hi].tolist(),
                         0.5, features.get("sliding_window"), features.get("logit_softcap"))
        torch.testing.assert_close(got[lo:hi].double(), expected, atol=1e-5, rtol=1e-5)
    assert _differs(got, _reference(b, None, **features))   # the limits change the result


@pytest.mark.parametrize("features", [{}, dict(sliding_window=6), dict(sliding_window=3,
                                                                       logit_softcap=1.5)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 1)])
def test_prefill_kernel_matches_reference(features, heads, kv_heads, prefill_pack):
    b, limits = batch(LAYOUT, heads, kv_heads, seed=2), key_limits(LAYOUT)
    expected = _reference(b, limits, **features)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                          0.5, max_seqlen_q=b.max_seqlen_q, last_key_positions=limits, **features)
    torch.testing.assert_close(got, expected, **TOL)
    assert _differs(got, _reference(b, None, **features))


def test_prefill_kernel_refuses_bad_limits():
    b, limits = batch(LAYOUT), key_limits(LAYOUT)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, 0.5)
    with pytest.raises(KernelArgumentError, match=r"last_key_positions must be \[num_tokens\]"):
        paged_attention(*args, last_key_positions=limits[:-1])
    with pytest.raises(KernelArgumentError, match="last_key_positions has dtype torch.float32"):
        paged_attention(*args, last_key_positions=limits.float())
    with pytest.raises(KernelArgumentError, match="pass causal=True"):
        paged_attention(*args, causal=False, last_key_positions=limits)
    with pytest.raises(ValueError, match="bidirectional_spans widens a causal mask"):
        AttentionSpec(0.5, causal=False, bidirectional_spans=True)


def _meta(b, limits, decode_split=None):
    return AttentionMetadata(slot_mapping=b.slot_mapping, cu_seqlens_q=b.cu_seqlens_q,
                             seq_lens=b.seq_lens, block_tables=b.block_tables,
                             max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k,
                             is_decode=False, decode_split=decode_split,
                             last_key_positions=limits)


def test_backends_honour_the_spec_with_a_split_mixed_step():
    # As the runner orders a mixed step: the decode first (the triton backend sends it to the
    # decode kernel, the rest to the prefill kernel with the limits after the decode row).
    layout = [LAYOUT[2], LAYOUT[0], LAYOUT[1], LAYOUT[3]]
    b, limits = batch(layout, seed=3), key_limits(layout)
    split = DecodeSplit(num_decodes=1, decode_seq_lens=b.seq_lens[:1].clone(),
                        decode_block_tables=b.block_tables[:1].clone(),
                        decode_max_seqlen_k=b.block_tables.shape[1] * 4,
                        prefill_cu_seqlens_q=(b.cu_seqlens_q[1:] - b.cu_seqlens_q[1]).clone(),
                        prefill_seq_lens=b.seq_lens[1:].clone(),
                        prefill_block_tables=b.block_tables[1:].clone())
    outputs = {}
    for spans in (True, False):   # a layer without bidirectional_spans ignores the limits
        spec = AttentionSpec(0.5, sliding_window=7, bidirectional_spans=spans)
        for name, backend, meta in (("torch_ref", TorchRefAttentionBackend(), _meta(b, limits)),
                                    ("triton", TritonAttentionBackend(),
                                     _meta(b, limits, split))):
            caches = (b.k_cache.clone(), b.v_cache.clone())
            outputs[name, spans] = backend.forward(b.q, b.k, b.v, *caches, meta, spec)
        torch.testing.assert_close(outputs["triton", spans], outputs["torch_ref", spans], **TOL)
    torch.testing.assert_close(outputs["torch_ref", True], _reference(b, limits, sliding_window=7))
    torch.testing.assert_close(outputs["torch_ref", False], _reference(b, None, sliding_window=7))
    assert _differs(outputs["triton", True], outputs["triton", False])
