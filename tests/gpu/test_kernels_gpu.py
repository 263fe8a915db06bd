"""Triton kernels on a real GPU at real sizes, against kernels/reference.py run on the GPU.

Not part of CI (CI has no GPU): run through tests/gpu/run_gpu_checks.sh on a GPU machine.
Every dtype (bf16 included, which the CPU interpreter cannot check) and every supported head
dim. Errors are measured as ||out - ref|| / ||ref||; outputs are poisoned with NaN first so an
unwritten element fails.
"""
from __future__ import annotations

import random

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from hpcinfer.kernels.cache import reshape_and_cache
from hpcinfer.kernels.decode_attention import count_partitions, paged_decode_attention
from hpcinfer.kernels.norm import rms_norm
from hpcinfer.kernels.prefill_attention import paged_attention
from hpcinfer.kernels.random_batch import make_paged_batch
from hpcinfer.kernels.rotary import rotary_embedding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/run_gpu_checks.sh on a GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HEAD_DIMS = [64, 80, 96, 128, 256]
# Relative error budgets (METHOD: fp32 far under 1e-3, bf16 operands 1e-3..1e-2).
MAX_REL_ERR = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DEVICE = "cuda"


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "output has NaN (unwritten or masked key read)"
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _decode_batch(num_seqs, max_len, heads, kv_heads, head_dim, dtype, seed=0):
    rng = random.Random(seed)
    lens = [rng.randint(1, max_len) for _ in range(num_seqs)]
    b = make_paged_batch(lens, [1] * num_seqs, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, block_size=16, dtype=dtype, device=DEVICE, seed=seed)
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode(dtype, head_dim):
    # 256 sequences of up to 1024 keys (split-K: 2 partitions of 512), 32 q / 8 kv heads.
    b = _decode_batch(256, 1024, 32, 8, head_dim, dtype)
    assert count_partitions(b.block_tables.shape[1] * 16) == 2
    out = torch.full_like(b.q, float("nan"))
    paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.088, out=out)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.088)
    assert rel_err(out, expected) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8), (64, 8)])
@pytest.mark.parametrize("sliding_window", [None, 300])
def test_decode_gqa_and_window(heads, kv_heads, sliding_window):
    b = _decode_batch(64, 2000, heads, kv_heads, 128, torch.bfloat16, seed=1)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.088, sliding_window=sliding_window)
    for partition_size in (None, 128):
        got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens,
                                     0.088, sliding_window=sliding_window,
                                     partition_size=partition_size)
        assert rel_err(got, expected) < MAX_REL_ERR[torch.bfloat16]


def test_decode_cuda_graph_replay_as_sequences_grow():
    # Capture once, then grow every sequence by a few tokens (new values copied into the
    # same buffers) and replay: the fixed grid must still cover every key.
    b = _decode_batch(32, 900, 32, 8, 128, torch.bfloat16, seed=2)
    seq_lens = b.seq_lens.clone()
    seq_lens.copy_(torch.clamp(b.seq_lens - 40, min=1))
    out = torch.empty_like(b.q)
    paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, seq_lens, 0.1, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, seq_lens, 0.1, out=out)
    seq_lens.copy_(b.seq_lens)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.1)
    assert rel_err(out, expected) < MAX_REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("partition_size", [None, 64])
def test_decode_shared_prefix(dtype, partition_size):
    # Workload P's pattern at a test's size: 512 rows behind 48 shared blocks (768 keys),
    # each with 1-300 keys of its own; the shared kernel + merge (epilogue or reduce).
    rng = random.Random(4)
    lens = [768 + rng.randint(1, 300) for _ in range(512)]
    b = make_paged_batch(lens, [1] * len(lens), num_heads=32, num_kv_heads=8, head_dim=128,
                         block_size=16, dtype=dtype, device=DEVICE, seed=4)
    b.block_tables[:, :48] = b.block_tables[0, :48]
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.088)
    got = paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.088,
                                 shared_prefix_len=768, partition_size=partition_size)
    assert rel_err(got, expected) < MAX_REL_ERR[dtype]


def _prefill_batch(head_dim, dtype, seed=0):
    # 8 sequences x 512 new tokens; some start mid-sequence (prefix hit / later chunk),
    # plus two decodes mixed in.
    context = [0, 0, 100, 256, 7, 512, 33, 1000]
    q_lens = [512] * 8 + [1, 1]
    seq_lens = [c + 512 for c in context] + [77, 1500]
    b = make_paged_batch(seq_lens, q_lens, num_heads=32, num_kv_heads=8, head_dim=head_dim,
                         block_size=16, dtype=dtype, device=DEVICE, seed=seed)
    reshape_and_cache(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill(dtype, head_dim, prefill_pack):
    b = _prefill_batch(head_dim, dtype)
    out = torch.full_like(b.q, float("nan"))
    paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                    0.088, out=out, max_seqlen_q=b.max_seqlen_q)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.088)
    assert rel_err(out, expected) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("causal,sliding_window", [(True, 128), (False, None)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_window_and_bidirectional(dtype, causal, sliding_window, prefill_pack):
    b = _prefill_batch(128, dtype, seed=1)
    kwargs = dict(causal=causal, sliding_window=sliding_window)
    got = paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                          0.088, max_seqlen_q=b.max_seqlen_q, **kwargs)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.088, **kwargs)
    assert rel_err(got, expected) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reshape_and_cache(dtype, head_dim):
    num_tokens, kv_heads = 4096, 8
    fused = torch.randn(num_tokens, 3 * kv_heads, head_dim, device=DEVICE, dtype=dtype)
    k, v = fused[:, kv_heads:2 * kv_heads], fused[:, 2 * kv_heads:]
    slots = torch.randperm(600 * 16, device=DEVICE)[:num_tokens]
    slots[::7] = -1
    caches = [torch.randn(600, 16, kv_heads, head_dim, device=DEVICE, dtype=dtype)
              for _ in range(2)]
    expected = [c.clone() for c in caches]
    reference.reshape_and_cache(k, v, *expected, slots)
    reshape_and_cache(k, v, *caches, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(dtype, weight_offset):
    x = torch.randn(4096, 4096, device=DEVICE, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(4096, device=DEVICE, dtype=dtype)
    for res in (None, residual):
        got, got_res = rms_norm(x, weight, 1e-6, res, weight_offset=weight_offset)
        expected, expected_res = reference.rms_norm(x, weight, 1e-6, res,
                                                    weight_offset=weight_offset)
        assert rel_err(got, expected) < MAX_REL_ERR[dtype] / 4
        if res is not None:
            assert torch.equal(got_res, expected_res)


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (96, 96), (128, 128),
                                                 (256, 128)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary(dtype, head_dim, rotary_dim):
    num_tokens = 4096
    qkv = torch.randn(num_tokens, 32 + 2 * 8, head_dim, device=DEVICE, dtype=dtype)
    q, k = qkv[:, :32], qkv[:, 32:40]
    positions = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, device=DEVICE) / rotary_dim)
    angles = torch.arange(8192, device=DEVICE)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    expected_q, expected_k = reference.rotary_embedding(positions, q, k, cos_sin)
    rotary_embedding(positions, q, k, cos_sin)
    assert rel_err(q, expected_q) < MAX_REL_ERR[dtype] / 4
    assert rel_err(k, expected_k) < MAX_REL_ERR[dtype] / 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_activations(dtype):
    x = torch.randn(4096, 2 * 8192, device=DEVICE, dtype=dtype) * 3
    for op, ref_op in ((silu_and_mul, reference.silu_and_mul),
                       (gelu_tanh_and_mul, reference.gelu_tanh_and_mul)):
        assert rel_err(op(x), ref_op(x)) < MAX_REL_ERR[dtype] / 4


def test_triton_backend_matches_torch_ref_bf16():
    from hpcinfer.layers.attention import (AttentionMetadata, AttentionSpec,
                                           TorchRefAttentionBackend)
    from hpcinfer.layers.attention_triton import TritonAttentionBackend
    b = make_paged_batch([700, 513, 64], [700, 13, 1], num_heads=32, num_kv_heads=8,
                         head_dim=64, block_size=16, dtype=torch.bfloat16, device=DEVICE)
    meta = AttentionMetadata(slot_mapping=b.slot_mapping, cu_seqlens_q=b.cu_seqlens_q,
                             seq_lens=b.seq_lens, block_tables=b.block_tables,
                             max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k,
                             is_decode=False)
    caches = [(b.k_cache.clone(), b.v_cache.clone()) for _ in range(2)]
    spec = AttentionSpec(0.125)
    got = TritonAttentionBackend().forward(b.q, b.k, b.v, *caches[0], meta, spec)
    expected = TorchRefAttentionBackend().forward(b.q, b.k, b.v, *caches[1], meta, spec)
    assert rel_err(got, expected) < MAX_REL_ERR[torch.bfloat16]


# --- attention spec features (AttentionSpec: logit softcap, sinks, per-layer windows) ---

# (logit_softcap, has_sinks, sliding_window): Gemma 2's real cap (50; barely bends random
# logits), a cap small enough to bend every logit, gpt-oss (sinks, window 128 on its sliding
# layers), and everything at once.
SPEC_FEATURES = [(50.0, False, None), (2.0, False, 300), (None, True, None), (None, True, 128),
                 (2.0, True, 300)]


def _features(heads: int, softcap, has_sinks, window, dtype) -> dict:
    # Sinks in the model dtype, as a bf16 checkpoint keeps them; spread like trained ones.
    gen = torch.Generator(device=DEVICE).manual_seed(heads)
    sinks = (torch.randn(heads, generator=gen, device=DEVICE) * 2).to(dtype) if has_sinks \
        else None
    return dict(logit_softcap=softcap, sinks=sinks, sliding_window=window)


@pytest.mark.parametrize("softcap,has_sinks,window", SPEC_FEATURES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 256), (64, 8, 64)])
def test_decode_spec_features(heads, kv_heads, head_dim, dtype, softcap, has_sinks, window):
    # Gemma-2-9B's and gpt-oss-20b's head layouts; 2000-key contexts, so split-K runs both
    # with the default partitions and with 128-key ones (the reduce adds each sink once).
    b = _decode_batch(64, 2000, heads, kv_heads, head_dim, dtype, seed=5)
    features = _features(heads, softcap, has_sinks, window, dtype)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.088, **features)
    assert count_partitions(b.block_tables.shape[1] * 16) > 1
    for partition_size in (None, 128):
        out = torch.full_like(b.q, float("nan"))
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.088,
                               out=out, partition_size=partition_size, **features)
        assert rel_err(out, expected) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("softcap,has_sinks,window", SPEC_FEATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_prefill_spec_features(head_dim, dtype, softcap, has_sinks, window):
    # Chunks after prefix hits cross the window edge; two decodes are mixed in.
    b = _prefill_batch(head_dim, dtype, seed=6)
    features = _features(32, softcap, has_sinks, window, dtype)
    out = torch.full_like(b.q, float("nan"))
    paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables,
                    0.088, out=out, max_seqlen_q=b.max_seqlen_q, **features)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.088, **features)
    assert rel_err(out, expected) < MAX_REL_ERR[dtype]


def test_decode_with_sinks_and_softcap_in_a_cuda_graph():
    # The sinks tensor is read by pointer and the cap is a launch constant: a captured graph
    # replays correctly after the sequences grow (nothing synchronises with the host).
    b = _decode_batch(32, 900, 64, 8, 64, torch.bfloat16, seed=7)
    features = _features(64, 2.0, True, 128, torch.bfloat16)
    seq_lens = torch.clamp(b.seq_lens - 40, min=1)
    out = torch.empty_like(b.q)
    paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, seq_lens, 0.1, out=out,
                           **features)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables, seq_lens, 0.1,
                               out=out, **features)
    seq_lens.copy_(b.seq_lens)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.1, **features)
    assert rel_err(out, expected) < MAX_REL_ERR[torch.bfloat16]


def test_triton_backend_mixed_step_per_layer_specs_bf16():
    # One mixed step (decodes first, then chunks) through layers with different specs on the
    # same metadata, DecodeSplit path included: each layer matches torch_ref with its spec.
    from hpcinfer.layers.attention import (AttentionMetadata, AttentionSpec, DecodeSplit,
                                           TorchRefAttentionBackend)
    from hpcinfer.layers.attention_triton import TritonAttentionBackend
    seq_lens, q_lens = [300, 1100, 700, 900], [1, 1, 700, 250]
    sinks = _features(32, None, True, None, torch.bfloat16)["sinks"]
    specs = [(AttentionSpec(0.0625, sliding_window=256, logit_softcap=50.0), None),
             (AttentionSpec(0.0625, logit_softcap=50.0), None),
             (AttentionSpec(0.125, sliding_window=128, has_sinks=True), sinks),
             (AttentionSpec(0.125, has_sinks=True), sinks)]
    for seed, (spec, layer_sinks) in enumerate(specs):
        b = make_paged_batch(seq_lens, q_lens, num_heads=32, num_kv_heads=8, head_dim=128,
                             block_size=16, dtype=torch.bfloat16, device=DEVICE, seed=seed)
        split = DecodeSplit(num_decodes=2, decode_seq_lens=b.seq_lens[:2].clone(),
                            decode_block_tables=b.block_tables[:2].clone(),
                            decode_max_seqlen_k=b.block_tables.shape[1] * 16,
                            prefill_cu_seqlens_q=(b.cu_seqlens_q[2:] - 2).clone(),
                            prefill_seq_lens=b.seq_lens[2:].clone(),
                            prefill_block_tables=b.block_tables[2:].clone())
        for decode_split in (split, None):
            meta = AttentionMetadata(slot_mapping=b.slot_mapping, cu_seqlens_q=b.cu_seqlens_q,
                                     seq_lens=b.seq_lens, block_tables=b.block_tables,
                                     max_seqlen_q=b.max_seqlen_q, max_seqlen_k=b.max_seqlen_k,
                                     is_decode=False, decode_split=decode_split)
            caches = [(b.k_cache.clone(), b.v_cache.clone()) for _ in range(2)]
            got = TritonAttentionBackend().forward(b.q, b.k, b.v, *caches[0], meta, spec,
                                                   layer_sinks)
            expected = TorchRefAttentionBackend().forward(b.q, b.k, b.v, *caches[1], meta, spec,
                                                          layer_sinks)
            assert rel_err(got, expected) < MAX_REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_rows", [True, False])
def test_grammar_mask_kernel_at_llama3_vocab_against_the_reference(dtype, with_rows):
    """kernels/grammar_mask.py at workload A's structured step (a 49,152-token tokenizer's
    bitmask over 128,256 logits; 200 of 256 rows constrained, out of order, or all 256)
    against its torch reference: bit for bit."""
    from hpcinfer.kernels.grammar_mask import apply_grammar_mask_, apply_grammar_mask_reference
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab, mask_vocab = 128_256, 49_152
    logits = torch.randn(256, vocab, device="cuda", generator=g).to(dtype)
    rows = torch.randperm(256, device="cuda", generator=g)[:200] if with_rows else None
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (200 if with_rows else 256,
                            mask_vocab // 32), device="cuda", generator=g,
                            dtype=torch.int64).to(torch.int32)
    want, got = logits.clone(), logits.clone()
    apply_grammar_mask_reference(want, rows, bitmask, mask_vocab)
    apply_grammar_mask_(got, rows, bitmask, mask_vocab)
    assert torch.equal(got, want)


def test_penalties_kernel_at_llama3_vocab_against_the_torch_penalties():
    """kernels/penalties.py at 256 penalised rows of a 128,256 vocabulary (workload A's
    sampled step), rows and state rows out of order, against the sampler's torch ops."""
    from hpcinfer.engine.sampler import apply_penalties
    from hpcinfer.kernels.penalties import apply_penalties_
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab, n = 128_256, 256
    logits = torch.randn(300, vocab, device="cuda", generator=g) * 4
    counts = torch.randint(0, 5, (320, vocab), device="cuda", generator=g, dtype=torch.int32)
    counts[counts < 4] = 0
    prompt = torch.rand(320, vocab, device="cuda", generator=g) < 0.01
    rows = torch.randperm(300, device="cuda", generator=g)[:n]
    slots = torch.randperm(320, device="cuda", generator=g)[:n].to(torch.int32)
    factors = torch.rand(n, 3, device="cuda", generator=g) * torch.tensor(
        [2.0, 2.0, 1.5], device="cuda") + torch.tensor([-1.0, -1.0, 0.5], device="cuda")
    want = logits.clone()
    want[rows] = apply_penalties(logits[rows], prompt[slots.long()], counts[slots.long()],
                                 factors[:, 0], factors[:, 1], factors[:, 2])
    got = logits.clone()
    apply_penalties_(got, rows, slots, counts, prompt, factors)
    # (a fused multiply-add may round the frequency term differently in the last bit)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
