"""Greedy tokens equal transformers generate(do_sample=False), for every family and through
every scheduling path: plain, preemption, chunked prefill, prefix caching, max_num_seqs."""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.tiny import TINY_FAMILIES

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# Every family also runs every scheduling variant (the whole file takes ~20 s on 2 cores).
VARIANT_FAMILIES = TINY_FAMILIES


def generate(path, prompts, **kwargs):
    llm = LLM(path, max_model_len=kwargs.pop("max_model_len", 256), **kwargs)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outs], engine


def assert_same(got, want, prompts):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {w}"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_matches_transformers(family, checkpoint, make_prompts, hf_greedy):
    prompts = make_prompts()
    got, engine = generate(checkpoint(family), prompts)
    assert_same(got, hf_greedy(family, prompts), prompts)
    assert all(len(g) == 32 for g in got)


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_greedy_with_preemption(family, checkpoint, make_prompts, hf_greedy):
    prompts = make_prompts()
    from hpcinfer.engine.llm_engine import LLMEngine
    # A pool of exactly one max_model_len sequence (16 blocks of 16 tokens): 8 prompts
    # totalling ~600 tokens cannot all run at once.
    llm = LLM(checkpoint(family), max_model_len=256, kv_cache_memory_bytes=_pool_bytes(
        checkpoint(family), 16))
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    engine: LLMEngine = llm.llm_engine
    assert engine.runner.num_blocks == 16
    assert engine.num_preemptions > 0
    assert_same([o.outputs[0].token_ids for o in outs], hf_greedy(family, prompts), prompts)
    engine.block_manager.check_invariants([])


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_greedy_with_chunked_prefill(family, checkpoint, make_prompts, hf_greedy):
    prompts = make_prompts()
    got, engine = generate(checkpoint(family), prompts, max_num_batched_tokens=48,
                           max_num_seqs=8)
    assert 48 < max(len(p) for p in prompts)
    assert engine.stats.num_steps > 32 + 1  # prefill really took several steps
    assert_same(got, hf_greedy(family, prompts), prompts)


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_greedy_with_shared_prefixes(family, checkpoint, make_prompts, hf_greedy):
    prefix = make_prompts([100], seed=5)[0]
    prompts = make_prompts((1, 7, 20, 33, 50, 64, 90, 16), seed=6, prefix=prefix)
    # max_num_seqs=2: later prompts are admitted after the prefix blocks were computed.
    got, engine = generate(checkpoint(family), prompts, max_num_seqs=2)
    assert engine.prefix_cache_hits >= 6 * 96
    assert_same(got, hf_greedy(family, prompts), prompts)


@pytest.mark.parametrize("family", VARIANT_FAMILIES)
def test_greedy_max_num_seqs_1_vs_64(family, checkpoint, make_prompts, hf_greedy):
    prompts = make_prompts()
    one, _ = generate(checkpoint(family), prompts, max_num_seqs=1, enable_prefix_caching=False)
    many, _ = generate(checkpoint(family), prompts, max_num_seqs=64)
    assert one == many
    assert_same(one, hf_greedy(family, prompts), prompts)


def _pool_bytes(path: str, num_blocks: int, block_size: int = 16) -> int:
    import json
    from pathlib import Path
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_block = 2 * cfg["num_hidden_layers"] * block_size * kv_heads * head_dim * 4  # fp32
    return num_blocks * per_block


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_greedy_with_everything_at_once(family, checkpoint, make_prompts, hf_greedy):
    """Tiny pool + chunked prefill + shared prefixes + mixed lengths, all in one run."""
    prefix = make_prompts([70], seed=8)[0]
    prompts = (make_prompts((3, 150, 12, 40), seed=9, prefix=prefix)
               + make_prompts((1, 199, 25, 64), seed=10))
    llm = LLM(checkpoint(family), max_model_len=256, max_num_batched_tokens=40,
              kv_cache_memory_bytes=_pool_bytes(checkpoint(family), 20))
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.num_preemptions > 0 and engine.prefix_cache_hits > 0
    assert_same([o.outputs[0].token_ids for o in outs], hf_greedy(family, prompts), prompts)
    engine.block_manager.check_invariants([])


def test_greedy_with_one_token_prefill_chunks(checkpoint, make_prompts, hf_greedy):
    """Budget 2 with 2 sequences: decode steps carry 1-token prefill chunks (is_decode is
    True while a sequence is still mid-prompt)."""
    prompts = make_prompts((5, 9, 17), seed=3)
    got, engine = generate(checkpoint("llama"), prompts, max_num_batched_tokens=2,
                           max_num_seqs=2)
    assert_same(got, hf_greedy("llama", prompts), prompts)


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_triton_backend_in_the_engine(family, checkpoint, make_prompts, hf_greedy):
    """The GPU attention backend through the whole engine (Triton interpreter on CPU; the
    conftest sets TRITON_INTERPRET=1): chunked prefill, a prefix-cache hit, decode."""
    prefix = make_prompts([40], seed=12)[0]
    prompts = make_prompts((3, 50), seed=13) + make_prompts((2, 9), seed=14, prefix=prefix)
    llm = LLM(checkpoint(family), max_model_len=256, attention_backend="triton",
              max_num_batched_tokens=32, max_num_seqs=2)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.prefix_cache_hits > 0
    assert_same([o.outputs[0].token_ids for o in outs], hf_greedy(family, prompts, 8), prompts)
