"""Every family against transformers (the oracle), fp32 on CPU, through the paged KV cache.

One flattened batch holds prompts of different lengths (prefill), then a few decode steps
add one token per sequence; logits must match transformers' forward on the same full
sequences. A chunked prefill (queries starting mid-sequence) is checked too.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.models.registry import load_model
from hpcinfer.testing.batch import (allocate_kv_caches, assign_block_tables, build_batch,
                                    num_blocks_needed)
from hpcinfer.testing.tiny import (TINY_FAMILIES, TINY_NEW_FAMILIES, build_tiny_checkpoint,
                                   tiny_checkpoint)

BLOCK_SIZE = 4
PROMPT_LENS = (1, 5, 33, 70)   # crosses blocks, and mistral's 32-token window
NUM_DECODE_STEPS = 3


def _hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    # Random tiny models give logits of magnitude ~1-30; fp32 reassociation differs by ~1e-5.
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def _random_prompts(vocab_size: int, lens, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lens]


def _check_prefill_then_decode(path, seed: int = 0) -> None:
    model = load_model(path, dtype=torch.float32, device="cpu", attention_backend="torch_ref")
    hf = _hf_model(path)
    spec = model.spec
    seqs = _random_prompts(spec.vocab_size, PROMPT_LENS, seed)
    tables = assign_block_tables([len(s) + NUM_DECODE_STEPS for s in seqs], BLOCK_SIZE)
    caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), BLOCK_SIZE,
                                spec.num_kv_heads, spec.head_dim)
    gen = torch.Generator().manual_seed(seed + 1)

    batch = build_batch(seqs, tables, BLOCK_SIZE)
    assert not batch.meta.is_decode
    with torch.no_grad():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))
    assert logits.dtype == torch.float32 and logits.shape == (sum(PROMPT_LENS), spec.vocab_size)
    cu = batch.meta.cu_seqlens_q.tolist()
    for i, seq in enumerate(seqs):
        _assert_logits_close(logits[cu[i]:cu[i + 1]], _hf_logits(hf, seq),
                             f"prefill, prompt of {len(seq)} tokens")

    for step in range(NUM_DECODE_STEPS):
        num_computed = [len(s) for s in seqs]
        for s in seqs:
            s.append(int(torch.randint(3, spec.vocab_size, (), generator=gen)))
        batch = build_batch(seqs, tables, BLOCK_SIZE, num_computed=num_computed)
        assert batch.meta.is_decode
        with torch.no_grad():
            logits = model.compute_logits(model(batch.input_ids, batch.positions, caches,
                                                batch.meta))
        for i, seq in enumerate(seqs):
            _assert_logits_close(logits[i], _hf_logits(hf, seq)[-1],
                                 f"decode step {step}, sequence of {len(seq)} tokens")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prefill_and_decode_match_transformers(family):
    _check_prefill_then_decode(tiny_checkpoint(family))


@pytest.mark.parametrize("family", [f for f in TINY_NEW_FAMILIES if f != "llama_dynamic"])
def test_new_families_prefill_and_decode_match_transformers(family):
    """Gemma 2/3 (prompts longer than their 8-token windows), Phi-3 (the 70-token prompt takes
    longrope's long factors, the others in the same batch the short ones), yarn."""
    _check_prefill_then_decode(tiny_checkpoint(family))


@pytest.mark.parametrize("family,overrides", [
    # opt-350m style: norm after each block, no final norm.
    ("opt", {"do_layer_norm_before": False}),
    # Qwen2 with a sliding window on the second layer only.
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    # Llama with biases everywhere, untied.
    ("llama", {"attention_bias": True, "mlp_bias": True}),
])
def test_config_variants_match_transformers(family, overrides, tmp_path):
    _check_prefill_then_decode(build_tiny_checkpoint(family, tmp_path, seed=3, **overrides),
                               seed=3)


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma", "gemma2", "gemma3", "phi3"])
def test_chunked_prefill_matches_transformers(family):
    """A prompt run in two chunks: the second chunk's queries start mid-sequence and attend
    to the first chunk through the cache."""
    path = tiny_checkpoint(family)
    model = load_model(path, dtype=torch.float32, device="cpu", attention_backend="torch_ref")
    spec = model.spec
    (seq,) = _random_prompts(spec.vocab_size, [50], seed=7)
    tables = assign_block_tables([len(seq)], BLOCK_SIZE)
    caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), BLOCK_SIZE,
                                spec.num_kv_heads, spec.head_dim)
    with torch.no_grad():
        first = build_batch([seq[:21]], tables, BLOCK_SIZE)
        model(first.input_ids, first.positions, caches, first.meta)
        second = build_batch([seq], tables, BLOCK_SIZE, num_computed=[21])
        logits = model.compute_logits(model(second.input_ids, second.positions, caches,
                                            second.meta))
    _assert_logits_close(logits, _hf_logits(_hf_model(path), seq)[21:], "second prefill chunk")


def test_no_cache_prefill_equals_paged_prefill():
    """Without a KV cache (profiling, pooling) the model gives the same hidden states."""
    model = load_model(tiny_checkpoint("qwen3"), dtype=torch.float32, device="cpu",
                       attention_backend="torch_ref")
    spec = model.spec
    seqs = _random_prompts(spec.vocab_size, (3, 17), seed=5)
    tables = assign_block_tables([len(s) for s in seqs], BLOCK_SIZE)
    caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), BLOCK_SIZE,
                                spec.num_kv_heads, spec.head_dim)
    batch = build_batch(seqs, tables, BLOCK_SIZE)
    with torch.no_grad():
        paged = model(batch.input_ids, batch.positions, caches, batch.meta)
        uncached = model(batch.input_ids, batch.positions, [None] * spec.num_layers, batch.meta)
    torch.testing.assert_close(uncached, paged, atol=1e-5, rtol=1e-5)


def test_bfloat16_load_converts_once_and_stays_close():
    """dtype=bfloat16: every parameter is bf16 and logits stay near transformers' bf16 ones
    (a loose check: the two round at different points, ~1% of the logit scale here)."""
    path = tiny_checkpoint("gemma")
    model = load_model(path, dtype=torch.bfloat16, device="cpu", attention_backend="torch_ref")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.spec.dtype == torch.bfloat16
    spec = model.spec
    (seq,) = _random_prompts(spec.vocab_size, [12], seed=9)
    tables = assign_block_tables([len(seq)], BLOCK_SIZE)
    caches = allocate_kv_caches(spec.num_layers, num_blocks_needed(tables), BLOCK_SIZE,
                                spec.num_kv_heads, spec.head_dim, dtype=torch.bfloat16)
    batch = build_batch([seq], tables, BLOCK_SIZE)
    with torch.no_grad():
        logits = model.compute_logits(model(batch.input_ids, batch.positions, caches, batch.meta))
    assert logits.dtype == torch.float32
    ref = _hf_logits(_hf_model(path, torch.bfloat16), seq)
    # Relative to the logit scale: a wrong norm, scale or activation is off by O(1).
    assert (logits - ref).abs().max() < 0.03 * ref.abs().max()
