"""The engine on a real GPU: Triton kernels, CUDA graphs and memory profiling end to end.

Not part of CI (CI has no GPU): run through tests/gpu/run_gpu_checks.sh on a GPU machine.

- fp32 tiny models of every family: greedy tokens identical to transformers, with the
  Triton backend and decode CUDA graphs on (and the graphs really replayed, the LM head in
  them);
- graphs on vs off (enforce_eager) give identical tokens while the batch shrinks through
  padded sizes; mixed steps split into decode graph + prefill give transformers' tokens;
- bf16, a random-init real-shaped model (Llama-3.2-1B widths, 4 layers): the first 32
  greedy tokens vs the torch_ref backend and torch ops agree ~70% (near-ties everywhere);
  the test asserts that every first divergence is at a near-tie;
- the same, teacher-forced (both backends fed torch_ref's tokens) next to free-running, at
  three LM-head init stds: every teacher-forced disagreement is at a near-tie;
- bf16, the same widths trained here to copy in context (a model with real margins;
  hpcinfer/testing/copy_model.py): workload A's 256 prompts, >= 99% of the first 32 greedy
  tokens agree with torch_ref (the issue's metric), and a decode kernel that reads one
  wrong KV block fails that metric;
- the KV pool is sized by the profiled forward.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcinfer.testing.greedy import (MAX_NEW, PROMPT_LENGTHS, agreement_run, hf_greedy,
                                      random_prompts)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/run_gpu_checks.sh on a GPU")

REPO = Path(__file__).resolve().parents[2]


def _generate(path, prompts, params, **kwargs):
    from hpcinfer import LLM
    llm = LLM(path, device="cuda", **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.llm_engine


# Prompt lengths under which transformers and we define longrope and dynamic NTK the same way
# (tests/engine/test_greedy_new_families.py's PLAIN table; docs/models.md says why): Phi-3's
# tiny config switches factors at 64 and no sequence crosses it while decoding; the dynamic
# Llama's rope covers 2 x 64 positions.
ROPE_SWITCH_LENGTHS = {"phi3": ((1, 9, 33, 65, 77, 200), 256),
                       "llama_dynamic": ((1, 9, 33, 50, 63), 128)}


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma",
                                    "opt", "gemma2", "gemma3", "phi3", "qwen2_yarn",
                                    "llama_dynamic"])
def test_tiny_fp32_greedy_matches_transformers_with_graphs(family):
    from hpcinfer import SamplingParams
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint(family))
    lengths, max_model_len = ROPE_SWITCH_LENGTHS.get(family, (PROMPT_LENGTHS, 256))
    prompts = random_prompts(lengths)
    got, engine = _generate(path, prompts,
                            SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True),
                            dtype="float32", max_model_len=max_model_len, max_num_seqs=16)
    runner = engine.runner
    assert runner.graphs is not None and runner.graphs.num_replays >= MAX_NEW - 1
    assert runner.graphs.num_logits_replays >= MAX_NEW - 1   # the LM head in the graphs
    want = hf_greedy(path, prompts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{family} prompt {i} (len {len(prompts[i])}): engine {g} != HF {w}"


def test_graphs_match_eager_while_batch_shrinks():
    # Different max_tokens per request: the decode batch shrinks 8 -> 1 through padded graph
    # sizes (7 -> 8, 5 -> 8, 3 -> 4); tokens must equal the eager run exactly (fp32).
    from hpcinfer import SamplingParams
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint("llama3"))
    prompts = random_prompts(seed=3)
    params = [SamplingParams(temperature=0, max_tokens=4 + 5 * i, ignore_eos=True)
              for i in range(len(prompts))]
    graphs, engine = _generate(path, prompts, params, dtype="float32", max_model_len=256)
    assert engine.runner.graphs.num_replays > 0
    eager, engine = _generate(path, prompts, params, dtype="float32", max_model_len=256,
                              enforce_eager=True)
    assert engine.runner.graphs is None
    assert graphs == eager


@pytest.mark.parametrize("split_attention", [True, False])
def test_mixed_steps_split_decodes(split_attention):
    # A small token budget keeps prefill chunks and >= 16 running decodes in the same steps.
    # split_attention (the default with graphs): one eager forward whose attention sends
    # decode rows to the decode kernel (layers/attention.py DecodeSplit); else decode graph
    # + eager prefill (cuda_graphs.DecodeGraphs.forward).
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.engine.cuda_graphs import MIN_SPLIT_DECODES
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint("llama3"))
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(2, 60, (48,), generator=g).tolist()
    prompts = random_prompts(lengths, seed=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256,
              max_num_batched_tokens=96, max_num_seqs=64)
    engine = llm.llm_engine
    assert engine.runner.split_mixed_attention
    engine.runner.split_mixed_attention = split_attention
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    if split_attention:
        assert engine.runner.graphs.num_split_attention > 0
    else:
        assert engine.runner.graphs.num_splits > 0, (
            f"no mixed step had {MIN_SPLIT_DECODES} decodes")
    want = hf_greedy(path, prompts, max_new=24)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"prompt {i} (len {len(prompts[i])}): engine {a} != HF {b}"


def test_shared_prefix_decode_steps_match_transformers(monkeypatch):
    # 72 rows behind one 300-token prompt (prefix caching on): the decode steps with >= 64
    # rows attend the shared blocks once (engine/shared_prefix.py), eagerly; the rest replay
    # graphs. Greedy tokens as transformers' (fp32).
    from hpcinfer import SamplingParams
    from hpcinfer.engine import shared_prefix
    from hpcinfer.engine.shared_prefix import ENV, MIN_ROWS
    from hpcinfer.testing.tiny import tiny_checkpoint
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(shared_prefix, "MIN_SAVED_BYTES", 0)   # a tiny model's KV is small
    path = str(tiny_checkpoint("llama3"))
    system = random_prompts((300,), seed=11)[0]
    prompts = [system + p for p in random_prompts([1 + i % 13 for i in range(72)], seed=12)]
    params = [SamplingParams(temperature=0, max_tokens=8 + i % 9, ignore_eos=True)
              for i in range(len(prompts))]
    got, engine = _generate(path, prompts, params, dtype="float32", max_model_len=512,
                            max_num_seqs=72, enable_prefix_caching=True)
    assert len(prompts) >= MIN_ROWS
    assert engine.runner.graphs.num_shared_prefix > 0 and engine.runner.graphs.num_replays > 0
    want = hf_greedy(path, prompts, max_new=16)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w[:len(g)], f"prompt {i}: engine {g} != HF {w[:len(g)]}"


def _load_bench():
    # throughput.py imports its sibling results_file.py, as a script run from bench/ would.
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  REPO / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_shaped_checkpoint(tmp_path_factory):
    bench = _load_bench()
    shape = dict(bench.SHAPES["llama-3.2-1b"], tie_word_embeddings=False)
    # lm_head std 3/sqrt(hidden): logits spread enough that bf16 rounding rarely flips argmax,
    # and outputs do not collapse into one repeated token.
    return str(bench.write_checkpoint(tmp_path_factory.mktemp("llama1b4"), shape, layers=4,
                                      max_position_embeddings=4096,
                                      lm_head_std=3 * 2048 ** -0.5))


def test_bf16_real_shape_agrees_with_torch_ref(real_shaped_checkpoint, monkeypatch):
    """Triton + graphs vs torch_ref + torch ops, bf16, 64 prompts x 256 ids, 32 greedy steps.

    A random-init model is chaotic: once one near-tie flips, the sequence's later tokens
    differ for reasons that are no error (measured: ~70% position-wise agreement over 32
    steps, printed as the issue's metric). What must hold is that every *first* divergence of
    a sequence happens at a near-tie of the reference (top-2 logprob gap under TIE_TOL), i.e.
    that with the same context both engines pick the same token unless the two best are
    within bf16 rounding of each other."""
    from hpcinfer import SamplingParams
    from hpcinfer.layers import ops
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 128000, (64, 256), generator=g).tolist()
    fast, engine = _generate(real_shaped_checkpoint, prompts,
                             SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                             dtype="bfloat16", max_model_len=512, max_num_seqs=64)
    assert engine.runner.graphs.num_replays > 0
    monkeypatch.setenv("HPCINFER_TORCH_OPS", "1")
    ops._triton_ops.cache_clear()
    try:
        from hpcinfer import LLM
        llm = LLM(real_shaped_checkpoint, device="cuda", dtype="bfloat16", max_model_len=512,
                  max_num_seqs=64, enforce_eager=True, attention_backend="torch_ref")
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True,
                                           logprobs=2), use_tqdm=False)
    finally:
        monkeypatch.delenv("HPCINFER_TORCH_OPS")
        ops._triton_ops.cache_clear()
    ref = [o.outputs[0].token_ids for o in outs]
    total = sum(len(r) for r in ref)
    same = sum(a == b for f, r in zip(fast, ref) for a, b in zip(f, r))
    before_divergence, divergence_gaps = 0, []
    for f, r, out in zip(fast, ref, outs):
        d = next((j for j, (a, b) in enumerate(zip(f, r)) if a != b), len(r))
        before_divergence += d
        if d < len(r):
            top = sorted((lp.logprob for lp in out.outputs[0].logprobs[d].values()),
                         reverse=True)
            divergence_gaps.append(top[0] - top[1])
    distinct = len({t for r in ref for t in r})
    print(f"bf16 agreement: position-wise {same}/{total} = {same / total:.4f}; tokens before "
          f"the first divergence {before_divergence / total:.4f}; {len(divergence_gaps)} "
          f"sequences diverge, reference top-2 gaps there: "
          f"{sorted(round(x, 4) for x in divergence_gaps)}; {distinct} distinct tokens")
    assert distinct > 64, "degenerate outputs would make the agreement meaningless"
    assert all(gap < TIE_TOL for gap in divergence_gaps), divergence_gaps
    assert before_divergence / total >= 0.5


TIE_TOL = 0.25   # nats; bf16 logits of this model carry ~1e-2 of rounding noise


def _record(name: str, result: dict) -> None:
    """Print, and append to $HPCINFER_GPU_RESULTS/agreement.jsonl when set (device runs)."""
    import json
    import os
    print(f"{name}: {json.dumps(result)}")
    out = os.environ.get("HPCINFER_GPU_RESULTS")
    if out:
        with open(Path(out) / "agreement.jsonl", "a") as f:
            f.write(json.dumps({"name": name, **result}) + "\n")


@pytest.mark.parametrize("std_scale", [3, 8, 16])
def test_bf16_agreement_teacher_forced_and_free(tmp_path_factory, std_scale):
    """bf16 agreement three ways on the Llama-3.2-1B-width 4-layer model, 64 x 256 prompts:
    free-running (each backend its own tokens; the issue's metric), teacher-forced (both fed
    torch_ref's tokens: per-step argmax agreement), for LM-head init std std_scale/sqrt(h)
    (3: the default model of the test above; 8 and 16 spread the logits more, towards a
    trained model's top-1/top-2 gaps). What must hold under teacher forcing: every
    disagreement is at a reference near-tie (gap < TIE_TOL at std 3).

    Measured (H100, 2026-11-24): the LM-head scale multiplies every logit and every logit
    error alike, so the argmax decisions and both agreements do not move (free 69.9-70.5%,
    teacher-forced 97.9-98.0% at std 3, 8 and 16; the gaps at the misses scale with the
    std): spreading the logits this way is no model of a trained checkpoint's margins, and
    the tie tolerance scales with it."""
    import statistics
    bench = _load_bench()
    shape = dict(bench.SHAPES["llama-3.2-1b"], tie_word_embeddings=False)
    path = str(bench.write_checkpoint(tmp_path_factory.mktemp(f"llama1b4s{std_scale}"), shape,
                                      layers=4, max_position_embeddings=4096,
                                      lm_head_std=std_scale * 2048 ** -0.5))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 128000, (64, 256), generator=g).tolist()
    ref = agreement_run(path, prompts, fast=False)
    ref_tokens = [ref.argmax[i] for i in range(len(prompts))]
    free = agreement_run(path, prompts, fast=True)
    forced = agreement_run(path, prompts, fast=True, forced=ref_tokens)
    ref_forced = agreement_run(path, prompts, fast=False, forced=ref_tokens)
    total = sum(len(r) for r in ref_tokens)
    free_same = sum(a == b for i, r in enumerate(ref_tokens)
                    for a, b in zip(free.argmax[i], r))
    # Teacher-forced: same context at every step; the reference's argmax there is ref_tokens
    # itself (ref_forced re-derives it, a determinism check of the torch_ref path).
    forced_same = sum(a == b for i, r in enumerate(ref_tokens)
                      for a, b in zip(forced.argmax[i], r))
    ref_repeat = sum(a == b for i, r in enumerate(ref_tokens)
                     for a, b in zip(ref_forced.argmax[i], r))
    gaps = [x for i in range(len(prompts)) for x in ref.gaps[i]]
    miss_gaps = sorted(round(ref.gaps[i][j], 4) for i, r in enumerate(ref_tokens)
                       for j, (a, b) in enumerate(zip(forced.argmax[i], r)) if a != b)
    result = {"lm_head_std": f"{std_scale}/sqrt(2048)", "tokens": total,
              "free_running": round(free_same / total, 4),
              "teacher_forced": round(forced_same / total, 4),
              "ref_repeat": round(ref_repeat / total, 4),
              "median_top2_gap_nats": round(statistics.median(gaps), 4),
              "p10_top2_gap_nats": round(sorted(gaps)[len(gaps) // 10], 4),
              "forced_miss_ref_gaps": miss_gaps[:40],
              "distinct_ref_tokens": len({t for r in ref_tokens for t in r})}
    _record(f"bf16 agreement std {std_scale}", result)
    assert ref_repeat == total, "torch_ref is not deterministic under teacher forcing"
    tie_tol = TIE_TOL * std_scale / 3   # logits (and their rounding) scale with the std
    assert all(gap < tie_tol for gap in miss_gaps), (tie_tol, miss_gaps)


@pytest.fixture(scope="module")
def copy_checkpoint(tmp_path_factory):
    """Llama-3.2-1B widths and tied embeddings, HPCINFER_COPY_LAYERS layers (default 4),
    trained here to continue a 256-id prompt with its own start (hpcinfer/testing/
    copy_model.py says why); ~1-3 min on an H100. Returns (path, training stats)."""
    import os

    from hpcinfer.testing.copy_model import workload_a_copy_checkpoint
    layers = int(os.environ.get("HPCINFER_COPY_LAYERS", "4"))
    overrides = {key: cast(os.environ[f"HPCINFER_COPY_{name}"])
                 for key, name, cast in (("max_steps", "STEPS", int), ("lr", "LR", float),
                                         ("time_budget_s", "TRAIN_S", float))
                 if f"HPCINFER_COPY_{name}" in os.environ}
    path, stats = workload_a_copy_checkpoint(tmp_path_factory.mktemp(f"copy1b{layers}"),
                                             layers=layers, **overrides)
    _record("copy model", stats)
    return str(path), stats


def _decode_skips_first_block(inner):
    """A deliberately broken decode kernel call: every sequence's first block-table entry
    points at its second block (a block-addressing bug), for the sensitivity check."""
    def broken(q, k_cache, v_cache, block_tables, seq_lens, scale, **kwargs):
        bad = block_tables.clone()
        bad[:, 0] = block_tables[:, 1]
        return inner(q, k_cache, v_cache, bad, seq_lens, scale, **kwargs)
    return broken


def test_bf16_trained_model_agrees_with_torch_ref(copy_checkpoint, monkeypatch):
    """The issue's bf16 metric on a model with real margins: workload A's 256 prompts
    (256 seeded random ids each), 32 greedy steps, Triton + CUDA graphs vs torch_ref + torch
    ops: >= 99% of generated tokens agree position-wise, free-running. The same model with a
    decode kernel that reads one wrong KV block must fail the metric (on the random-init
    model correct kernels already fail it, ~70%, so there it cannot single out the bug; the
    broken kernel was not run on that model)."""
    import statistics

    from hpcinfer.layers import attention_triton
    path, stats = copy_checkpoint
    assert stats["held_acc"] >= 0.99, f"the copy model did not train: {stats}"
    bench = _load_bench()
    prompts = [p for p, _ in bench.make_requests("A")]
    assert len(prompts) == 256 and {len(p) for p in prompts} == {256}
    kwargs = {"max_num_seqs": 256, "max_model_len": 512}
    ref = agreement_run(path, prompts, fast=False, **kwargs)
    ref_tokens = [ref.argmax[i] for i in range(len(prompts))]
    free = agreement_run(path, prompts, fast=True, **kwargs)
    forced = agreement_run(path, prompts, fast=True, forced=ref_tokens, **kwargs)
    total = sum(len(r) for r in ref_tokens)

    def agree(run):
        return sum(a == b for i, r in enumerate(ref_tokens)
                   for a, b in zip(run.argmax[i], r)) / total

    def copies(run):   # the model's own skill: output k == prompt[k]
        return sum(a == b for i, p in enumerate(prompts)
                   for a, b in zip(run.argmax[i], p)) / total

    monkeypatch.setattr(attention_triton, "paged_decode_attention",
                        _decode_skips_first_block(attention_triton.paged_decode_attention))
    broken = agreement_run(path, prompts, fast=True, **kwargs)
    monkeypatch.undo()
    gaps = sorted(x for i in range(len(prompts)) for x in ref.gaps[i])
    result = {"model": f"copy-trained Llama-3.2-1B widths, {stats['layers']} layers",
              "train": stats, "prompts": len(prompts), "tokens": total,
              "free_running": round(agree(free), 4), "teacher_forced": round(agree(forced), 4),
              "copy_acc_torch_ref": round(copies(ref), 4),
              "copy_acc_triton": round(copies(free), 4),
              "broken_decode_free_running": round(agree(broken), 4),
              "median_top2_gap_nats": round(statistics.median(gaps), 3),
              "p1_top2_gap_nats": round(gaps[len(gaps) // 100], 3),
              "min_top2_gap_nats": round(gaps[0], 3)}
    _record("bf16 agreement, trained model", result)
    assert agree(free) >= 0.99, result
    assert agree(broken) < 0.9, result


def test_kv_pool_sized_by_profile(real_shaped_checkpoint):
    from hpcinfer import LLM
    # enforce_eager: 2048 sequences would mean 260 decode graphs; this test is about sizing.
    llm = LLM(real_shaped_checkpoint, device="cuda", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=2048, gpu_memory_utilization=0.5, enforce_eager=True)
    runner = llm.llm_engine.runner
    profile = runner.memory_profile
    assert profile is not None and profile.activation_peak > 0
    pool = runner.num_blocks * runner.bytes_per_block()
    # The profiled budget, not the cap (2048 x 256 blocks x 128 KiB = 64 GiB), sized the pool.
    assert pool <= profile.kv_budget < 0.5 * profile.total
    assert pool > 0.5 * profile.kv_budget
    # This process stays inside its share (other test workers may share the GPU).
    assert torch.cuda.memory_reserved() <= 0.5 * profile.total


def test_host_to_device_copies_do_not_wait_for_the_gpu():
    """layers/transfer.py and the LoRA slot buffer: with a long kernel queued, the copies
    return at once (a pageable copy returns only after the kernel) and carry the data."""
    import numpy as np

    from hpcinfer.layers.transfer import copy_to, to_device
    from hpcinfer.lora.layers import StepSlots
    slots = StepSlots(64, torch.device("cuda"))
    buffer = torch.zeros(4, dtype=torch.int32, device="cuda")

    def copies():
        return (to_device(np.arange(5), "cuda"), to_device([0.5, 1.5], "cuda", torch.float32),
                copy_to(buffer, np.array([1, 2, 3, 4])), slots.set(np.array([0, -1, 1])))
    copies()   # the pinned allocator's first blocks (steps reuse cached ones)
    torch.cuda.synchronize()
    start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000_000)   # ~1 s of GPU time at H200 clocks
    done.record()
    t0 = time.perf_counter()
    a, b, _, _ = copies()
    host_s = time.perf_counter() - t0
    assert not done.query(), "the GPU sleep ended before the copies returned"
    torch.cuda.synchronize()
    assert host_s < 0.1 * start.elapsed_time(done) / 1e3
    assert a.tolist() == list(range(5)) and b.tolist() == [0.5, 1.5]
    assert buffer.tolist() == [1, 2, 3, 4] and slots.buffer[:3].tolist() == [0, -1, 1]
    on_gpu = torch.arange(3, device="cuda")   # already on the device: nothing to pin
    assert to_device(on_gpu, "cuda").tolist() == [0, 1, 2]
    assert copy_to(buffer[:3], on_gpu).tolist() == [0, 1, 2]


def test_structured_outputs_on_the_gpu_valid_and_free_rows_unchanged():
    """Structured outputs with Triton, CUDA graphs and async scheduling (the mask applied by
    kernels/grammar_mask.py): a tiny random fp32 model, JSON-schema, choice and regex rows
    beside free rows. Every constrained row ends with "stop" and holds to its constraint, with
    the chunked fills and accepts on several threads; the free rows' tokens are those of a run
    without the constrained rows."""
    import json
    import re

    from hpcinfer import LLM, SamplingParams
    from hpcinfer.sampling_params import StructuredOutputsParams
    from hpcinfer.testing.tiny import tiny_checkpoint
    llm = LLM(str(tiny_checkpoint("llama")), device="cuda", dtype="float32", max_model_len=512,
              max_num_seqs=64)
    schema = {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                 "minItems": 1, "maxItems": 3}},
        "required": ["label", "tags"], "additionalProperties": False}
    kinds = [StructuredOutputsParams(json=schema, disable_any_whitespace=True),
             StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
             StructuredOutputsParams(regex=r"[a-c]{2,4}-[0-9]")]
    prompts = [f"Row {i}: say something" for i in range(48)]
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(prompts[:16], [free] * 16, use_tqdm=False)
    params = [free if i < 16 else SamplingParams(temperature=0.8, seed=i, max_tokens=200,
                                                 structured_outputs=kinds[i % 3])
              for i in range(48)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, out in enumerate(outs[:16]):
        assert out.outputs[0].token_ids == alone[i].outputs[0].token_ids, i
    for i, out in enumerate(outs[16:], start=16):
        text, kind = out.outputs[0].text, i % 3
        assert out.outputs[0].finish_reason == "stop", (i, text)
        if kind == 0:
            value = json.loads(text)
            assert value["label"] in ("positive", "negative") and 1 <= len(value["tags"]) <= 3
        elif kind == 1:
            assert text in ("yes", "no", "maybe so")
        else:
            assert re.fullmatch(r"[a-c]{2,4}-[0-9]", text), text
    assert llm.llm_engine.runner.graphs is not None
    assert llm.llm_engine.structured.apply_s > 0
