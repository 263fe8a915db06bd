"""Mixture of experts on a real GPU: the fused Triton kernel at real sizes, inside a CUDA
graph, and the MoE families through the engine with Triton + decode CUDA graphs.

Not part of CI (CI has no GPU): run through tests/gpu/run_gpu_checks.sh on a GPU machine
(GPU_TESTS=tests/gpu/test_moe_gpu.py for this file alone).

- bf16 and fp32 kernel vs the torch reference (the same per-expert loop transformers runs) at
  Qwen3-30B-A3B, Mixtral-8x7B (fewer experts) and gpt-oss-20b layer shapes, decode and prefill
  token counts;
- router + pair sorting + both GEMMs captured in one CUDA graph and replayed on new inputs;
- tiny fp32 Mixtral / Qwen2-MoE / Qwen3-MoE / gpt-oss: greedy tokens identical to
  transformers with the Triton backend and decode graphs really replayed.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.testing.cuda_graphs import capture
from hpcinfer.testing.greedy import MAX_NEW, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/run_gpu_checks.sh on a GPU")

# name -> (hidden, expert intermediate, experts, top_k, activation, biases)
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, "silu", False),
    "mixtral-8x7b/4": (4096, 14336, 4, 2, "silu", False),
    "gpt-oss-20b": (2880, 2880, 32, 4, "swiglu_oai", True),
}


def _problem(name, num_tokens, dtype, seed=0):
    from hpcinfer.kernels import moe_reference as ref
    hidden, inter, experts, top_k, act, bias = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)
    x = randn(num_tokens, hidden)
    args = dict(w_gate_up=randn(experts, 2 * inter, hidden, scale=hidden ** -0.5),
                w_down=randn(experts, hidden, inter, scale=inter ** -0.5))
    logits = torch.randn(num_tokens, experts, generator=g, device="cuda")
    weights, ids = ref.select_experts(logits, top_k, scoring="softmax_topk", renormalize=True)
    kw = dict(activation=act)
    if bias:
        kw.update(b_gate_up=randn(experts, 2 * inter, scale=0.1),
                  b_down=randn(experts, hidden, scale=0.1))
    return x, args, weights, ids, kw


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("num_tokens", [1, 64, 256, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_experts_match_reference_at_real_sizes(name, num_tokens, dtype):
    from hpcinfer.kernels import moe_reference as ref
    from hpcinfer.kernels.fused_moe import fused_experts
    if dtype == torch.float32 and num_tokens == 2048:
        pytest.skip("fp32 checked at the smaller token counts")
    x, w, weights, ids, kw = _problem(name, num_tokens, dtype)
    got = fused_experts(x, w["w_gate_up"], w["w_down"], weights, ids, **kw)
    want = ref.fused_experts(x, w["w_gate_up"], w["w_down"], weights, ids, **kw)
    assert got.dtype == dtype and torch.isfinite(got).all()
    # bf16: both round the intermediate to bf16 in different places; fp32: IEEE dots.
    assert _rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("num_tokens,block_m", [(1, 16), (64, 16), (256, 32), (1024, 64),
                                                  (1024, 128), (2048, 64)])
def test_triton_alignment_equals_the_torch_form_on_the_gpu(num_tokens, block_m):
    from hpcinfer.kernels.fused_moe import align_pairs_to_blocks, align_pairs_to_blocks_torch
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    ids = torch.randint(0, 128, (num_tokens, 8), device="cuda", generator=g)
    ids[::5, 3] = -1
    got = align_pairs_to_blocks(ids, 128, block_m)
    want = align_pairs_to_blocks_torch(ids, 128, block_m)
    for name, a, b in zip(("sorted_pairs", "block_expert", "num_rows"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("num_tokens,num_experts,top_k,scoring,renormalize", [
    (1, 128, 8, "softmax_topk", True), (1024, 128, 8, "softmax_topk", True),
    (300, 60, 4, "softmax_topk", False), (513, 32, 4, "topk_softmax", False),
    (64, 8, 2, "softmax_topk", True)])
def test_router_kernel_matches_the_reference_on_the_gpu(num_tokens, num_experts, top_k,
                                                         scoring, renormalize):
    from hpcinfer.kernels import moe_reference as ref
    from hpcinfer.kernels.moe_router import select_experts
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
    weights, ids = select_experts(logits, top_k, scoring=scoring, renormalize=renormalize)
    want_weights, want_ids = ref.select_experts(logits, top_k, scoring=scoring,
                                                renormalize=renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)


def test_moe_layer_replays_in_a_cuda_graph():
    from hpcinfer.kernels import moe_reference as ref
    from hpcinfer.kernels.fused_moe import fused_experts
    hidden, inter, experts, top_k, _, _ = SHAPES["qwen3-30b-a3b"]
    x, w, _, _, _ = _problem("qwen3-30b-a3b", 128, torch.bfloat16)
    router = torch.randn(experts, hidden, device="cuda", dtype=torch.bfloat16) * 0.05

    def layer(inp):
        weights, ids = ref.select_experts(inp @ router.t(), top_k, scoring="softmax_topk",
                                          renormalize=True)
        return fused_experts(inp, w["w_gate_up"], w["w_down"], weights, ids)
    static_in = x.clone()
    graph, static_out = capture(lambda: layer(static_in))   # compiles outside the capture
    for seed in (1, 2):
        new = _problem("qwen3-30b-a3b", 128, torch.bfloat16, seed=seed)[0]
        static_in.copy_(new)
        graph.replay()
        torch.testing.assert_close(static_out, layer(new), atol=0, rtol=0)


def _hf_reads_swiglu_limit() -> bool:
    # transformers before 5.2x hard-codes GptOssExperts' limit to 7.0 (5.17 does; the GPU
    # image has it), where later versions and hpcinfer read config.swiglu_limit. The tiny
    # config's 1.5 would make that oracle disagree, so it gets the released 7.0 there.
    import inspect
    from transformers.models.gpt_oss import modeling_gpt_oss
    return "config.swiglu_limit" in inspect.getsource(modeling_gpt_oss.GptOssExperts.__init__)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_tiny_moe_fp32_greedy_matches_transformers_with_graphs(family, tmp_path):
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.tiny import build_tiny_checkpoint, tiny_checkpoint
    path = str(tiny_checkpoint(family))
    if family == "gpt_oss" and not _hf_reads_swiglu_limit():
        path = str(build_tiny_checkpoint(family, tmp_path / family, swiglu_limit=7.0))
    prompts = random_prompts((1, 3, 9, 17, 40, 77, 130, 200))
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, max_num_seqs=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                        use_tqdm=False)
    runner = llm.llm_engine.runner
    assert runner.graphs is not None and runner.graphs.num_replays >= MAX_NEW - 1
    want = hf_greedy(path, prompts)
    for i, (out, w) in enumerate(zip(outs, want)):
        assert list(out.outputs[0].token_ids) == w, f"{family} prompt {i} ({len(prompts[i])})"
