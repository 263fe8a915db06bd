"""LoRA on a real GPU: the Triton shrink/expand kernels at real sizes, inside CUDA graphs,
and the engine's decode graphs with adapters (issue 23).

Not part of CI (CI has no GPU): run through tests/gpu/run_gpu_checks.sh on a GPU machine,
e.g. ``GPU_TESTS=tests/gpu/test_lora_gpu.py bash tests/gpu/run_gpu_checks.sh "$OUT"``.
Needs peft (the oracle, and to write the test adapters): ``pip install --no-deps
peft==0.21.2 accelerate==1.16.0 psutil`` where the image lacks them (peft imports both).

- kernels: bf16 and fp32 at Llama-8B widths, rows of 4 slots and base rows, against the
  torch reference on the GPU; the split-K shrink partials and the one expand over every piece
  of a merged layer (q/k/v, gate/up) at 1B/8B shapes, decode and prefill row counts;
- a captured graph of shrink + expand replays correctly after the slot indices and the slot
  weights change in place (what an adapter swap between decode steps does);
- fp32 tiny Llama-3 and Qwen2 with three adapters (ranks 4/8/16, different targets) and base
  rows, more adapters than max_loras: greedy tokens with decode graphs == enforce_eager ==
  transformers + peft, while the batch shrinks through padded graph sizes; the same with
  mixed steps split into a decode graph and an eager prefill;
- bf16: graphs vs eager, every first divergence at a near-tie of the eager run, and the
  adapters change the output;
- the same engine tests with the shrink as rows of the base GEMM ("stacked") and as its own
  kernel, and the stacked GEMM + expand at real sizes and in a captured graph.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/run_gpu_checks.sh on a GPU")

MAX_NEW = 16
TIE_TOL = 0.25   # nats, as test_engine_gpu.py: bf16 rounding noise of a tiny random model


def _require_peft():
    if importlib.util.find_spec("peft") is None:
        pytest.fail("these tests need peft (oracle and test adapters): pip install --no-deps "
                    "peft==0.21.2 accelerate==1.16.0 psutil", pytrace=False)


# --- kernels ---

def _kernel_case(num_tokens, k, n, rank, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, k, device="cuda", generator=g).to(dtype)
    a = (torch.randn(4, rank, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(4, n, rank, device="cuda", generator=g) / rank ** 0.5).to(dtype)
    slots = torch.randint(-1, 4, (num_tokens,), device="cuda", generator=g, dtype=torch.int32)
    return x, a, b, slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens,k,n,rank", [(1, 4096, 4096, 16), (256, 4096, 14336, 16),
                                                  (77, 14336, 4096, 8), (512, 2048, 512, 64)])
def test_kernels_match_reference_at_real_sizes(dtype, num_tokens, k, n, rank):
    from hpcinfer.kernels import lora, lora_reference
    x, a, b, slots = _kernel_case(num_tokens, k, n, rank, dtype)
    shrunk = lora.lora_shrink(x, a, slots)
    want_shrunk = lora_reference.lora_shrink(x.float(), a.float(), slots)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shrunk.float(), want_shrunk, **tol)
    y = torch.randn(num_tokens, n, device="cuda").to(dtype)
    got, want = y.clone(), y.float().clone()
    lora.lora_expand(got, shrunk, b, slots)
    lora_reference.lora_expand(want, shrunk.float(), b.float(), slots)
    torch.testing.assert_close(got.float(), want, **tol)
    assert torch.equal(got[slots < 0], y[slots < 0])


def _stacked_a(rows, k, dtype, seed):
    # A of a merged layer: [4 slots, pieces * rank, K]
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(4, rows, k, device="cuda", generator=g) / k ** 0.5).to(dtype)


# (rows, K, output pieces, rank): the merged q/k/v and gate/up layers and down of Llama-3.2-1B
# and -3.1-8B at decode batch sizes (split-K shrink) and a prefill chunk, one launch each
MERGED_CASES = [(1, 2048, (2048, 512, 512), 16), (64, 2048, (8192, 8192), 16),
                (256, 4096, (4096, 1024, 1024), 16), (256, 14336, (4096,), 16),
                (200, 4096, (14336, 14336), 8), (2048, 2048, (2048, 512, 512), 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens,k,pieces,rank", MERGED_CASES)
def test_merged_layer_shrink_partials_and_one_expand(dtype, num_tokens, k, pieces, rank):
    """What a wrapped layer runs: split-K partials of the stacked A, then one expand over
    every piece of the output, each piece from its own rank block; rows without an adapter
    untouched, and whole 64-row tiles of them (rows past 3/4 of the batch)."""
    from hpcinfer.kernels import lora, lora_reference
    n, p = sum(pieces), len(pieces)
    bounds = tuple(sum(pieces[:i]) for i in range(p + 1))
    x, a, b, slots = _kernel_case(num_tokens, k, n, rank, dtype)
    a = _stacked_a(p * rank, k, dtype, seed=1)
    slots[num_tokens * 3 // 4:] = -1
    slots[0] = 2    # at least one row with an adapter (the 1-row case)
    parts = lora.lora_shrink_partials(x, a, slots)
    assert parts.shape == (lora.shrink_split(num_tokens, k), num_tokens, p * rank)
    if num_tokens <= 256:
        assert parts.shape[0] > 1   # decode sizes split K
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    want_shrunk = lora_reference.lora_shrink(x.float(), a.float(), slots)
    torch.testing.assert_close(parts.sum(0), want_shrunk, **tol)
    y = torch.randn(num_tokens, n, device="cuda").to(dtype)
    got, want = y.clone(), y.float().clone()
    lora.lora_expand(got, parts, b, slots, bounds)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):   # piece by piece
        lora_reference.lora_expand(want[:, lo:hi], want_shrunk[:, i * rank:(i + 1) * rank],
                                   b[:, lo:hi].float().contiguous(), slots)
    torch.testing.assert_close(got.float(), want, **tol)
    assert torch.equal(got[slots < 0], y[slots < 0])
    assert not torch.equal(got[slots >= 0], y[slots >= 0])


@pytest.mark.parametrize("stacked", [False, True])
def test_captured_merged_layer_follows_new_slots_and_swapped_weights(stacked):
    """A merged q/k/v layer's LoRA work captured once, replayed after the slot indices and a
    slot's weights change in place: the separate shrink + expand into the output, or
    (stacked) the GEMM over [W; every slot's A] + the stacked expand, A then a view of the
    stacked weight (what a swap writes into)."""
    from hpcinfer.kernels import lora, lora_reference
    bounds = (0, 2048, 2560, 3072)
    x, _, b, slots = _kernel_case(256, 2048, 3072, 16, torch.float32)
    a = _stacked_a(48, 2048, torch.float32, seed=3)
    w = torch.randn(3072, 2048, device="cuda") / 2048 ** 0.5
    if stacked:
        weight = torch.cat([w, a.reshape(-1, 2048)])
        a = weight[3072:].view(a.shape)
    y, out = torch.zeros(256, 3072, device="cuda"), {}

    def run():
        if stacked:
            full = torch.nn.functional.linear(x, weight)
            out["y"] = lora.lora_expand_stacked(full[:, :3072], full[:, 3072:], b, slots,
                                                bounds)
        else:
            y.zero_()
            lora.lora_expand(y, lora.lora_shrink_partials(x, a, slots), b, slots, bounds)
            out["y"] = y
    run()   # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2, 3):
        x2, _, b2, slots2 = _kernel_case(256, 2048, 3072, 16, torch.float32, seed=seed)
        if seed == 3:
            slots2[:128] = -1     # two whole row tiles of base rows
        x.copy_(x2)
        slots.copy_(slots2)
        a[2].copy_(_stacked_a(48, 2048, torch.float32, seed=10 + seed)[2])
        b[2].copy_(b2[2])
        graph.replay()
        want = x @ w.t() if stacked else torch.zeros_like(y)
        lora_reference.lora_expand(want, lora_reference.lora_shrink(x, a, slots), b, slots,
                                   bounds)
        torch.testing.assert_close(out["y"], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens,k,pieces,rank", MERGED_CASES)
def test_stacked_gemm_and_expand(dtype, num_tokens, k, pieces, rank):
    """The stacked layer's work (hpcinfer/lora/layers.py): one GEMM over [W; every slot's A]
    then lora_expand_stacked over its strided halves, against the separate shrink and the
    torch reference; rows without an adapter are the base output exactly."""
    from hpcinfer.kernels import lora, lora_reference
    n, p = sum(pieces), len(pieces)
    bounds = tuple(sum(pieces[:i]) for i in range(p + 1))
    x, _, b, slots = _kernel_case(num_tokens, k, n, rank, dtype)
    a = _stacked_a(p * rank, k, dtype, seed=1)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
    slots[num_tokens * 3 // 4:] = -1
    slots[0] = 2
    y = torch.nn.functional.linear(x, torch.cat([w, a.reshape(-1, k)]))
    got = lora.lora_expand_stacked(y[:, :n], y[:, n:], b, slots, bounds)
    base = torch.nn.functional.linear(x, w)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    want = base.float().clone()
    lora_reference.lora_expand(want, lora_reference.lora_shrink(x.float(), a.float(), slots),
                               b.float(), slots, bounds)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(got[slots < 0], y[:, :n][slots < 0], atol=0, rtol=0)
    separate = base.clone()
    lora.lora_expand(separate, lora.lora_shrink_partials(x, a, slots), b, slots, bounds)
    torch.testing.assert_close(got.float(), separate.float(), **tol)


def test_captured_kernels_follow_new_slots_and_swapped_weights():
    from hpcinfer.kernels import lora, lora_reference
    x, a, b, slots = _kernel_case(64, 2048, 3072, 16, torch.float32)
    y = torch.zeros(64, 3072, device="cuda")
    lora.lora_expand(y, lora.lora_shrink(x, a, slots), b, slots)   # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        lora.lora_expand(y, lora.lora_shrink(x, a, slots), b, slots)
    for seed in (1, 2):
        x2, a2, b2, slots2 = _kernel_case(64, 2048, 3072, 16, torch.float32, seed=seed)
        # what a step and a swap do: copy into the static tensors, never rebind them
        x.copy_(x2)
        slots.copy_(slots2)
        a[1].copy_(a2[1])
        b[1].copy_(b2[1])
        graph.replay()
        want = torch.zeros_like(y)
        lora_reference.lora_expand(want, lora_reference.lora_shrink(x, a, slots), b, slots)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


# --- the engine ---

ADAPTERS = {
    "qv-r4": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=11),
    "all-r8-rs": dict(rank=8, alpha=4.0, use_rslora=True, seed=12,
                      targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj")),
    "mlp-r16": dict(rank=16, alpha=16.0, targets=("gate_proj", "down_proj"), seed=13),
}


@pytest.fixture(scope="module")
def tiny_with_adapters(tmp_path_factory):
    """family -> (checkpoint path, {adapter name: LoRARequest})."""
    _require_peft()
    from hpcinfer.lora.request import LoRARequest
    from hpcinfer.testing.tiny import tiny_checkpoint
    from hpcinfer.testing.tiny_lora import build_tiny_adapter
    built = {}

    def get(family):
        if family not in built:
            path = str(tiny_checkpoint(family))
            requests = {}
            for i, (name, kw) in enumerate(ADAPTERS.items()):
                out = build_tiny_adapter(path, tmp_path_factory.mktemp(f"{family}-{name}"), **kw)
                requests[name] = LoRARequest(name, i + 1, str(out))
            built[family] = path, requests
        return built[family]
    return get


def _rows(requests, seed=3):
    from hpcinfer.testing.greedy import random_prompts
    prompts = random_prompts((1, 9, 17, 40, 77), seed=seed)
    return [(p, name) for p in prompts for name in (*requests, None)]


def _run(path, rows, requests, *, max_tokens, logprobs=None, **kwargs):
    from hpcinfer import LLM, SamplingParams
    llm = LLM(path, device="cuda", enable_lora=True, max_loras=2, max_lora_rank=16,
              max_model_len=256, **kwargs)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=logprobs)
              for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in rows], params, use_tqdm=False,
                        lora_request=[requests[n] if n else None for _, n in rows])
    return outs, llm.llm_engine


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(params=["separate", "stacked"])
def shrink(request, monkeypatch):
    """Both ways the layers compute the shrink (hpcinfer/lora/layers.py)."""
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", request.param)
    return request.param


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fp32_graphs_equal_eager_equal_peft(family, tiny_with_adapters, shrink):
    from hpcinfer.testing.tiny_lora import peft_greedy
    path, requests = tiny_with_adapters(family)
    rows = _rows(requests)
    # different lengths: the decode batch shrinks through padded graph sizes
    max_tokens = [4 + (3 * i) % MAX_NEW for i in range(len(rows))]
    graphs_outs, engine = _run(path, rows, requests, max_tokens=max_tokens, dtype="float32",
                               max_num_seqs=8)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.lora_slots is not None and graphs.num_replays > 0
    assert all(layer.stacked == (shrink == "stacked") for layer in engine.lora.layers)
    assert engine.lora.num_slot_loads > 2        # 3 adapters, 2 slots: swapped
    eager_outs, engine = _run(path, rows, requests, max_tokens=max_tokens, dtype="float32",
                              max_num_seqs=8, enforce_eager=True)
    assert engine.runner.graphs is None
    assert _tokens(graphs_outs) == _tokens(eager_outs)
    for (prompt, name), got, m in zip(rows, _tokens(graphs_outs), max_tokens):
        adapter = requests[name].lora_path if name else None
        want = peft_greedy(path, adapter, [prompt], m)[0]
        assert got == want, f"{family}: adapter {name}, prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("split_attention", [True, False])
def test_fp32_mixed_steps_with_adapters_equal_peft(split_attention, tiny_with_adapters,
                                                   monkeypatch, shrink):
    # A small token budget keeps prefill chunks beside running decodes. split_attention off
    # and MIN_SPLIT_DECODES 1: decode graph + eager prefill, the prefill rows' LoRA slots
    # moved after the replay (cuda_graphs.py).
    from hpcinfer.engine import cuda_graphs
    from hpcinfer.testing.tiny_lora import peft_greedy
    monkeypatch.setattr(cuda_graphs, "MIN_SPLIT_DECODES", 1)
    path, requests = tiny_with_adapters("llama3")
    rows = _rows(requests, seed=5) * 2
    from hpcinfer import LLM, SamplingParams
    llm = LLM(path, device="cuda", dtype="float32", enable_lora=True, max_loras=2,
              max_lora_rank=16, max_model_len=256, max_num_batched_tokens=48, max_num_seqs=16)
    runner = llm.llm_engine.runner
    runner.split_mixed_attention = split_attention
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in rows],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False, lora_request=[requests[n] if n else None for _, n in rows])
    if split_attention:
        assert runner.graphs.num_split_attention > 0
    else:
        assert runner.graphs.num_splits > 0
    for (prompt, name), got in zip(rows, _tokens(outs)):
        adapter = requests[name].lora_path if name else None
        assert got == peft_greedy(path, adapter, [prompt], 12)[0], (name, len(prompt))


def test_bf16_graphs_agree_with_eager_up_to_near_ties(tiny_with_adapters, shrink):
    path, requests = tiny_with_adapters("llama3")
    rows = _rows(requests, seed=9)
    max_tokens = [MAX_NEW] * len(rows)
    fast, engine = _run(path, rows, requests, max_tokens=max_tokens, dtype="bfloat16",
                        max_num_seqs=8)
    assert engine.runner.graphs.num_replays > 0
    eager, _ = _run(path, rows, requests, max_tokens=max_tokens, dtype="bfloat16",
                    max_num_seqs=8, enforce_eager=True, logprobs=2)
    gaps, total, same = [], 0, 0
    for f, out in zip(_tokens(fast), eager):
        ref = out.outputs[0].token_ids
        total += len(ref)
        same += sum(a == b for a, b in zip(f, ref))
        d = next((j for j, (a, b) in enumerate(zip(f, ref)) if a != b), None)
        if d is not None:
            top = sorted((lp.logprob for lp in out.outputs[0].logprobs[d].values()),
                         reverse=True)
            gaps.append(top[0] - top[1])
    print(f"bf16 LoRA graphs vs eager: {same}/{total} tokens agree; first divergences at "
          f"top-2 gaps {sorted(round(g, 4) for g in gaps)}")
    assert all(g < TIE_TOL for g in gaps), gaps
    # the adapters matter in bf16 too: a row's tokens differ from the base row's
    by_prompt = {}
    for (prompt, name), f in zip(rows, _tokens(fast)):
        by_prompt.setdefault(tuple(prompt), {})[name] = f
    changed = sum(v[name] != v[None] for v in by_prompt.values() for name in requests)
    assert changed >= len(by_prompt) * len(requests) // 2, changed
