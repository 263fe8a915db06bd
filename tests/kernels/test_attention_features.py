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


# --- Triton kernels against the reference (TRITON_INTERPRET=1, set in tests/conftest.py) ---

from hpcinfer.kernels.decode_attention import count_partitions, paged_decode_attention  # noqa: E402
from hpcinfer.kernels.launch_checks import KernelArgumentError  # noqa: E402
from hpcinfer.kernels.prefill_attention import paged_attention  # noqa: E402
from hpcinfer.layers.attention import DecodeSplit  # noqa: E402
from hpcinfer.layers.attention_triton import TritonAttentionBackend  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
SINKS = [1.5, -2.0, 0.0, 3.0, -0.5, 2.5, -4.0, 0.7]   # per query head; up to 8 heads
# Softcaps small enough to bend the logits of head_dim-24 random vectors at scale 0.5.
FEATURES = {
    "softcap": dict(logit_softcap=1.5),
    "sinks": dict(sinks=True),
    "softcap_sinks_window": dict(logit_softcap=2.0, sinks=True, sliding_window=6),
    "sinks_window": dict(sinks=True, sliding_window=9),
}
# Block size 4. Sequence 0: a prefill chunk after a prefix-cache hit (16 cached tokens =
# 4 whole blocks), its 7 queries crossing a window edge; sequence 1: a later chunk that
# starts mid-block; sequence 2: a whole prompt longer than the window; sequence 3: a chunk
# after 67 cached tokens (without a window the kernel's unmasked fast path runs over whole
# key tiles first); sequence 4: a decode.
PREFILL_LAYOUT = ([23, 18, 13, 70, 12], [7, 5, 13, 3, 1])


def _features(name: str, heads: int, dtype=torch.float32) -> dict:
    features = dict(FEATURES[name])
    if features.pop("sinks", False):
        features["sinks"] = torch.tensor(SINKS[:heads], dtype=dtype)
    return features


def _cached_batch(seq_lens, q_lens, heads, kv_heads, head_dim=24, dtype=torch.float32, seed=0):
    b = make_paged_batch(seq_lens, q_lens, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, block_size=4, dtype=dtype, seed=seed)
    reference.reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1)])   # GQA, MQA
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_prefill_kernel_features_match_reference(name, heads, kv_heads, prefill_pack):
    b = _cached_batch(*PREFILL_LAYOUT, heads, kv_heads, seed=11)
    features = _features(name, heads)
    expected = _paged_reference(b, 0.5, **features)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                          0.5, max_seqlen_q=b.max_seqlen_q, **features)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_prefill_kernel_features_fp16_with_fp16_sinks(prefill_pack):
    # Model-dtype sinks (a bf16/fp16 checkpoint keeps them so); the kernel reads them as fp32.
    b = _cached_batch(*PREFILL_LAYOUT, 8, 2, dtype=torch.float16, seed=12)
    features = _features("softcap_sinks_window", 8, torch.float16)
    expected = _paged_reference(b, 0.5, **features)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                          0.5, max_seqlen_q=b.max_seqlen_q, **features)
    torch.testing.assert_close(got, expected, **TOL[torch.float16])


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1)])
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_decode_kernel_split_k_features_match_reference(name, heads, kv_heads):
    # Lengths 0 (a CUDA-graph padding row: zeros), 1, block edges, longer than every window.
    # partition_size 16 over a 40-key table: 3 partitions, so the sink must be added by the
    # reduce kernel exactly once; None: the single-partition path adds it in the main kernel.
    lens = [0, 1, 4, 13, 29, 40]
    b = _cached_batch(lens, [0] + [1] * (len(lens) - 1), heads, kv_heads, seed=13)
    q = torch.randn(len(lens), heads, 24, generator=torch.Generator().manual_seed(2))
    features = _features(name, heads)
    expected = reference.paged_decode_attention(q[1:], b.k_cache, b.v_cache, b.block_tables[1:],
                                                b.seq_lens[1:], 0.5, **features)
    assert count_partitions(b.block_tables.shape[1] * 4, 16) == 3
    for partition_size in (16, None):
        got = paged_decode_attention(q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.5,
                                     partition_size=partition_size, **features)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        torch.testing.assert_close(got[1:], expected, **TOL[torch.float32])


def test_kernels_refuse_bad_sinks_and_softcap():
    b = _cached_batch([5], [1], 4, 2)
    with pytest.raises(KernelArgumentError, match=r"sinks must be \[num_heads\] = \[4\]"):
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 1.0,
                               sinks=torch.zeros(2))
    with pytest.raises(KernelArgumentError, match="sinks has dtype torch.int64"):
        paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                        1.0, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="logit_softcap=-1.0 must be > 0"):
        paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                        1.0, logit_softcap=-1.0)


def _backend_meta(b, *, is_decode=False, decode_split=None) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=b.slot_mapping, cu_seqlens_q=b.cu_seqlens_q,
                             seq_lens=b.seq_lens, block_tables=b.block_tables,
                             max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k,
                             is_decode=is_decode, decode_split=decode_split)


def _mixed_step_split(b, num_decodes: int) -> DecodeSplit:
    # As ModelRunner builds it: the leading one-token rows go to the decode kernel.
    k = num_decodes
    return DecodeSplit(num_decodes=k, decode_seq_lens=b.seq_lens[:k].clone(),
                       decode_block_tables=b.block_tables[:k].clone(),
                       decode_max_seqlen_k=b.block_tables.shape[1] * 4,
                       prefill_cu_seqlens_q=(b.cu_seqlens_q[k:] - b.cu_seqlens_q[k]).clone(),
                       prefill_seq_lens=b.seq_lens[k:].clone(),
                       prefill_block_tables=b.block_tables[k:].clone())


def test_backend_mixed_step_with_per_layer_specs_matches_torch_ref():
    # One mixed step (two decodes, then a chunk across a window edge after a prefix-cache hit
    # and a whole prompt) run through two "layers" whose specs differ, as Gemma 2's sliding
    # and global layers do, on the same metadata: each must match torch_ref with its own spec.
    seq_lens, q_lens = [9, 30, 23, 13], [1, 1, 7, 13]
    heads, kv_heads = 8, 2
    sinks = torch.tensor(SINKS[:heads])
    layers = [(AttentionSpec(0.5, sliding_window=6, logit_softcap=2.0, has_sinks=True), sinks),
              (AttentionSpec(0.5, logit_softcap=2.0, has_sinks=True), sinks),
              (AttentionSpec(0.5, sliding_window=10), None)]
    for seed, (spec, layer_sinks) in enumerate(layers):
        b = make_paged_batch(seq_lens, q_lens, num_heads=heads, num_kv_heads=kv_heads,
                             head_dim=24, block_size=4, dtype=torch.float32, seed=20 + seed)
        meta = _backend_meta(b, decode_split=_mixed_step_split(b, 2))
        ref_cache = (b.k_cache.clone(), b.v_cache.clone())
        got = TritonAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, spec,
                                               layer_sinks)
        expected = TorchRefAttentionBackend().forward(b.q, b.k, b.v, *ref_cache, meta, spec,
                                                      layer_sinks)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_backend_decode_step_and_no_cache_path_match_torch_ref():
    spec = AttentionSpec(0.5, sliding_window=5, logit_softcap=1.5, has_sinks=True)
    sinks = torch.tensor(SINKS[:4])
    b = make_paged_batch([3, 17, 26], [1, 1, 1], num_heads=4, num_kv_heads=1, head_dim=24,
                         block_size=4, dtype=torch.float32, seed=30)
    meta = _backend_meta(b, is_decode=True)
    ref_cache = (b.k_cache.clone(), b.v_cache.clone())
    got = TritonAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, spec,
                                           sinks)
    expected = TorchRefAttentionBackend().forward(b.q, b.k, b.v, *ref_cache, meta, spec, sinks)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    # No KV cache (profiling, pooling): whole sequences, bidirectional as an encoder would be.
    w = make_paged_batch([6, 11], [6, 11], num_heads=4, num_kv_heads=1, head_dim=24,
                         block_size=4, dtype=torch.float32, seed=31)
    for spec in (AttentionSpec(0.5, sliding_window=4, logit_softcap=1.5, has_sinks=True),
                 AttentionSpec(0.5, causal=False, has_sinks=True)):
        meta = _backend_meta(w)
        got = TritonAttentionBackend().forward(w.q, w.k, w.v, None, None, meta, spec, sinks)
        expected = TorchRefAttentionBackend().forward(w.q, w.k, w.v, None, None, meta, spec,
                                                      sinks)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])
