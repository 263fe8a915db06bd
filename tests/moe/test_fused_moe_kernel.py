"""The fused MoE Triton kernel (interpreted) against its torch reference, the routers against
transformers', and the pair-sorting step's invariants.

bf16 math is wrong in the interpreter (it computes on raw bits), so bf16 runs only on the GPU
(tests/gpu); fp32 and fp16 run here, on shapes small enough to interpret in seconds.
"""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import moe_reference as ref
from hpcinfer.kernels.fused_moe import (ALIGN_MAX_PAIRS, align_pairs_to_blocks,
                                        align_pairs_to_blocks_torch, fused_experts)
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.moe_router import select_experts as triton_select_experts

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _problem(num_tokens, hidden, inter, num_experts, top_k, dtype, *, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5)
    w_down = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = ref.select_experts(logits, top_k, scoring="softmax_topk", renormalize=True)
    biases = {}
    if bias:
        biases = dict(b_gate_up=torch.randn(num_experts, 2 * inter, generator=g).to(dtype),
                      b_down=torch.randn(num_experts, hidden, generator=g).to(dtype))
    return x, w_gate_up.to(dtype), w_down.to(dtype), weights, ids, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 5, 2), (9, 7, 4), (23, 3, 1)])
def test_silu_experts_match_reference(dtype, num_tokens, num_experts, top_k):
    # hidden 48 and inter 40 are not multiples of the 32-wide tiles: the masks are exercised.
    x, wgu, wd, weights, ids, _ = _problem(num_tokens, 48, 40, num_experts, top_k, dtype)
    got = fused_experts(x, wgu, wd, weights, ids)
    want = ref.fused_experts(x, wgu, wd, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_gpt_oss_activation_with_biases_matches_reference():
    x, wgu, wd, weights, ids, biases = _problem(11, 32, 24, 5, 2, torch.float32, bias=True)
    for limit in (0.5, 7.0):   # 0.5: most gates and ups are clamped
        got = fused_experts(x, wgu, wd, weights, ids, activation="swiglu_oai", alpha=1.702,
                            limit=limit, **biases)
        want = ref.fused_experts(x, wgu, wd, weights, ids, activation="swiglu_oai",
                                 alpha=1.702, limit=limit, **biases)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_ids_of_other_ranks_experts_contribute_nothing():
    # Expert parallelism marks another rank's experts -1 (and any id >= num_experts is out).
    x, wgu, wd, weights, ids, _ = _problem(6, 32, 16, 4, 2, torch.float32)
    ids = ids.clone()
    ids[0, 0], ids[2, :], ids[5, 1] = -1, -1, 4
    want = ref.fused_experts(x, wgu, wd, weights, ids)
    assert torch.equal(want[2], torch.zeros(32))
    torch.testing.assert_close(fused_experts(x, wgu, wd, weights, ids), want,
                               **TOL[torch.float32])


def test_align_pairs_to_blocks_groups_each_expert_in_whole_blocks():
    ids = torch.tensor([[2, 0], [2, 4], [-1, 2], [0, 3], [2, 7]])
    sorted_pairs, block_expert, num_rows = align_pairs_to_blocks(ids, num_experts=5, block_m=4)
    num_pairs, rows = ids.numel(), int(num_rows)
    flat = ids.flatten()
    assert rows == 4 * 4                        # experts 0, 2, 3, 4 used, one block each
    seen = []
    for b in range(rows // 4):
        block = sorted_pairs[4 * b:4 * b + 4]
        real = block[block < num_pairs]
        assert real.numel() > 0 and bool((flat[real.long()] == block_expert[b]).all())
        seen += real.tolist()
    assert sorted(seen) == [i for i in range(num_pairs) if 0 <= flat[i] < 5]
    assert bool((block_expert[rows // 4:] == -1).all())
    assert bool((sorted_pairs[rows:] == num_pairs).all())


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [
    (1, 8, 128, 16), (5, 2, 5, 4), (64, 8, 128, 16), (300, 8, 128, 64), (100, 4, 60, 32),
    (7, 1, 3, 16), (1024, 2, 256, 128), (ALIGN_MAX_PAIRS // 8, 8, 128, 64)])
def test_triton_alignment_equals_the_torch_form(num_tokens, top_k, num_experts, block_m):
    # the three-launch alignment (decode sizes) against the torch ops it replaces, with some
    # pairs of another rank's experts (-1) and expert counts that are not powers of two
    g = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=g)
    ids[::7, 0] = -1
    got = align_pairs_to_blocks(ids, num_experts, block_m)
    want = align_pairs_to_blocks_torch(ids, num_experts, block_m)
    for name, a, b in zip(("sorted_pairs", "block_expert", "num_rows"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_alignment_past_the_triton_limit_still_sorts():
    ids = torch.zeros(ALIGN_MAX_PAIRS // 2 + 1, 2, dtype=torch.int64)
    sorted_pairs, block_expert, num_rows = align_pairs_to_blocks(ids, 4, 64)
    assert int(num_rows) == ids.numel() // 64 * 64 + 64
    assert torch.equal(sorted_pairs[:ids.numel()], torch.arange(ids.numel(), dtype=torch.int32))


def test_launcher_names_bad_arguments():
    x, wgu, wd, weights, ids, _ = _problem(3, 32, 16, 4, 2, torch.float32)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):
        fused_experts(x, wgu[:, :20], wd, weights, ids)
    with pytest.raises(KernelArgumentError, match="topk_weights has dtype"):
        fused_experts(x, wgu, wd, weights.half(), ids)
    with pytest.raises(KernelArgumentError, match="share a dtype"):
        fused_experts(x.half(), wgu, wd, weights, ids)
    with pytest.raises(KernelArgumentError, match="unknown activation"):
        fused_experts(x, wgu, wd, weights, ids, activation="gelu")


def _hf_router(model_type: str, **kw):
    from transformers import AutoConfig
    import importlib
    config = AutoConfig.for_model(model_type, hidden_size=16, **kw)
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    name = {"mixtral": "MixtralTopKRouter", "qwen3_moe": "Qwen3MoeTopKRouter",
            "gpt_oss": "GptOssTopKRouter"}[model_type]
    router = getattr(module, name)(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return router


@pytest.mark.parametrize("model_type,kw,scoring,renormalize", [
    ("mixtral", dict(num_local_experts=5, num_experts_per_tok=2), "softmax_topk", True),
    ("qwen3_moe", dict(num_experts=7, num_experts_per_tok=4, norm_topk_prob=False),
     "softmax_topk", False),
    ("qwen3_moe", dict(num_experts=7, num_experts_per_tok=3, norm_topk_prob=True),
     "softmax_topk", True),
    ("gpt_oss", dict(num_local_experts=5, num_experts_per_tok=2), "topk_softmax", False),
])
def test_select_experts_matches_transformers_routers(model_type, kw, scoring, renormalize):
    router = _hf_router(model_type, **kw)
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, want_weights, want_ids = router(x)
    weights, ids = ref.select_experts(logits, router.top_k, scoring=scoring,
                                      renormalize=renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,scoring,renormalize", [
    (5, 8, 2, "softmax_topk", True), (33, 128, 8, "softmax_topk", True),
    (7, 60, 4, "softmax_topk", False), (9, 32, 4, "topk_softmax", False),
    (3, 3, 1, "softmax_topk", True), (17, 256, 8, "softmax_topk", True),
    (1, 128, 32, "softmax_topk", False)])
def test_router_kernel_matches_the_reference(num_tokens, num_experts, top_k, scoring,
                                              renormalize):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(7))
    weights, ids = triton_select_experts(logits, top_k, scoring=scoring,
                                         renormalize=renormalize)
    want_weights, want_ids = ref.select_experts(logits, top_k, scoring=scoring,
                                                renormalize=renormalize)
    assert ids.dtype == want_ids.dtype and torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)


def test_router_kernel_breaks_ties_by_the_lowest_expert():
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0]])
    weights, ids = triton_select_experts(logits, 2, scoring="softmax_topk", renormalize=True)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5]]))


def test_router_kernel_names_what_it_does_not_take():
    with pytest.raises(KernelArgumentError, match="unknown router scoring"):
        triton_select_experts(torch.zeros(2, 8), 2, scoring="sigmoid", renormalize=True)
    with pytest.raises(KernelArgumentError, match="at most 256 experts"):
        triton_select_experts(torch.zeros(2, 300), 2, scoring="softmax_topk", renormalize=True)
