"""Issue 17's families and rope types: greedy tokens equal transformers generate(do_sample=False).

Gemma 2 (softcapping, query_pre_attn_scalar, sandwich norms, alternating 8-token windows),
Gemma 3 (q/k norms, local and global ropes, MQA, head_dim != hidden / heads), Phi-3 (fused
checkpoint tensors, partial rotary, longrope switching at 64), Qwen2 with yarn (positions up
to 4x the original 64) and Llama with dynamic NTK (past 64). Prompt lengths are chosen per
family so that windows are shorter than prompts and the rope switches are crossed during
decoding; see docs/models.md for the longrope and dynamic semantics they pin down.
"""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.tiny import TINY_NEW_FAMILIES

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

# family -> (prompt lengths, max_model_len). 32 new tokens follow each prompt.
PLAIN = {
    "gemma2": ((1, 3, 9, 17, 40, 77, 130), 256),
    "gemma3": ((1, 3, 9, 17, 40, 77, 130), 256),
    # Up to 33 stays within 64 (32 tokens need 31 decode steps); 65.. are long prompts, in
    # one batch with the short ones: each sequence picks its own factors. Sequences crossing
    # 64 while decoding: test_phi3_crossing_the_switch_while_decoding.
    "phi3": ((1, 9, 33, 65, 77, 200), 256),
    "qwen2_yarn": ((1, 17, 40, 77, 200), 256),      # max_position_embeddings is 64
    "llama_dynamic": ((1, 9, 33, 50, 63), 128),     # all but 1 and 9 decode past 64
}

# family -> (prefix length, suffix lengths, max_num_batched_tokens): block_size 4, two
# sequences at a time so later prompts hit the prefix's cached blocks, and a token budget that
# cuts prefills mid-window (Gemma's windows are 8 tokens).
SCHEDULED = {
    "gemma2": (20, (1, 7, 13, 30), 5),
    "gemma3": (20, (1, 7, 13, 30), 5),
    # Every sequence stays within 64 tokens (see PLAIN); a chunked prompt crossing 64 is one of
    # the cases docs/models.md says differ from transformers.
    "phi3": (20, (1, 6, 13), 7),
    "qwen2_yarn": (20, (3, 50, 90), 7),
    "llama_dynamic": (20, (1, 13, 40), 7),
}


def generate(path, prompts, max_tokens=32, **kwargs):
    llm = LLM(path, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    engine.block_manager.check_invariants([])
    return [o.outputs[0].token_ids for o in outs], engine


def assert_same(got, want, prompts):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {w}"


@pytest.mark.parametrize("family", TINY_NEW_FAMILIES)
def test_greedy_matches_transformers(family, checkpoint, make_prompts, hf_greedy):
    lengths, max_model_len = PLAIN[family]
    prompts = make_prompts(lengths, seed=21)
    got, _ = generate(checkpoint(family), prompts, max_model_len=max_model_len)
    assert_same(got, hf_greedy(family, prompts), prompts)


@pytest.mark.parametrize("family", TINY_NEW_FAMILIES)
def test_greedy_chunked_prefill_prefix_hits_block_size_4(family, checkpoint, make_prompts,
                                                         hf_greedy):
    prefix_len, suffixes, budget = SCHEDULED[family]
    prefix = make_prompts([prefix_len], seed=22)[0]
    prompts = make_prompts(suffixes, seed=23, prefix=prefix)
    got, engine = generate(checkpoint(family), prompts, max_model_len=PLAIN[family][1],
                           block_size=4, max_num_batched_tokens=budget, max_num_seqs=2)
    assert engine.prefix_cache_hits >= (len(prompts) - 1) * 16  # 4 full blocks of the prefix
    assert engine.stats.num_steps > 32 + max(len(p) for p in prompts) // budget
    assert_same(got, hf_greedy(family, prompts), prompts)


def test_phi3_long_prompts_share_a_prefix_past_the_switch(checkpoint, make_prompts, hf_greedy):
    """Prompts longer than original_max_position_embeddings reuse a 70-token prefix computed
    with the long factors; shorter ones run in the same batch with the short factors."""
    prefix = make_prompts([70], seed=24)[0]
    with_prefix = make_prompts((1, 9, 30), seed=25, prefix=prefix)
    short = make_prompts((5, 20), seed=26)
    # Two at a time: the first pair computes the prefix, the later two with it hit its blocks.
    prompts = [with_prefix[0], short[0], with_prefix[1], with_prefix[2], short[1]]
    got, engine = generate(checkpoint("phi3"), prompts, max_model_len=256, block_size=4,
                           max_num_seqs=2)
    assert engine.prefix_cache_hits >= 2 * 68
    assert_same(got, hf_greedy("phi3", prompts), prompts)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_triton_backend_in_the_engine(family, checkpoint, make_prompts, hf_greedy):
    """Logit softcapping and alternating windows (Gemma 2), per-layer windows, MQA, head_dim
    32 (Gemma 3) and a partially rotated longrope model (Phi-3) through the Triton kernels (interpreter on CPU: the conftest sets
    TRITON_INTERPRET=1), with chunked prefill and a prefix-cache hit."""
    prefix = make_prompts([12], seed=27)[0]
    prompts = make_prompts((3, 30), seed=28) + make_prompts((2, 9), seed=29, prefix=prefix)
    got, engine = generate(checkpoint(family), prompts, max_tokens=8, max_model_len=128,
                           attention_backend="triton", block_size=4,
                           max_num_batched_tokens=11, max_num_seqs=2)
    assert engine.prefix_cache_hits > 0
    assert_same(got, hf_greedy(family, prompts, 8), prompts)


def _greedy_without_cache_reset(path, prompt: list[int], max_new: int) -> list[int]:
    """transformers' own Phi-3 layers, stepped by hand so the KV cache is never recomputed:
    each forward's rope follows that forward's length (transformers' per-forward switch), the
    keys of earlier steps stay as they were. generate() instead recomputes the whole cache
    once the sequence passes original_max_position_embeddings."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        while len(tokens) < max_new:
            position = len(prompt) + len(tokens) - 1
            out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True,
                        position_ids=torch.tensor([[position]]))
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_phi3_crossing_the_switch_while_decoding(checkpoint, make_prompts, hf_greedy):
    """A sequence that passes 64 while decoding keeps its short-factor keys and continues with
    long factors (transformers' generate would recompute the whole cache with long factors at
    that step: docs/models.md). The tokens before the crossing equal generate's."""
    prompts = make_prompts((40, 64), seed=30)
    got, _ = generate(checkpoint("phi3"), prompts, max_model_len=256)
    for prompt, tokens, reference in zip(prompts, got, hf_greedy("phi3", prompts)):
        assert tokens == _greedy_without_cache_reset(checkpoint("phi3"), prompt, 32)
        before_crossing = 64 - len(prompt) + 1  # tokens sampled from forwards of <= 64 tokens
        assert tokens[:before_crossing] == reference[:before_crossing]


def test_phi3_through_the_decode_graph_buffers(checkpoint, make_prompts, hf_greedy):
    """Longrope picks rows per sequence from the step's metadata; under CUDA graphs that is
    the padded static buffers (padding rows have length 0), with long and short sequences
    decoding in one padded batch. The graphs are stood in for by eager replays over those
    buffers (as tests/engine/test_cuda_graphs_cpu.py does; test modules cannot import each
    other)."""
    from hpcinfer.engine.cuda_graphs import DecodeGraphs

    # 18 short prompts, then long ones admitted as short ones finish (prefilled whole: a
    # budget of 512), then decoding beside the short ones.
    prompts = make_prompts([2 + i for i in range(18)] + [70, 90, 66], seed=31)
    llm = LLM(checkpoint("phi3"), device="cpu", dtype="float32", max_model_len=256,
              max_num_seqs=18, max_num_batched_tokens=512, attention_backend="torch_ref")
    runner = llm.llm_engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.config.max_num_seqs,
                          runner.max_blocks_per_seq, runner.spec.hidden_size, runner.spec.dtype,
                          runner.device)

    class EagerGraph:
        def __init__(self, bs):
            self.bs = bs

        def replay(self):
            graphs.outputs[self.bs] = graphs._forward(self.bs)

    graphs.graphs = {bs: EagerGraph(bs) for bs in graphs.sizes}
    runner.graphs = graphs
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 9, ignore_eos=True)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert graphs.num_replays > 0
    for prompt, out, param in zip(prompts, outs, params):
        want = hf_greedy("phi3", [prompt], param.max_tokens)[0]
        assert out.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens"
