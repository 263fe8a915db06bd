"""Offline throughput on one GPU: hpcinfer next to transformers (and vLLM when installed).

Builds random-init checkpoints of real model shapes on the fly (seeded, written shard by shard
as safetensors with a word-level tokenizer of the full vocabulary; nothing is instantiated
through transformers), runs every engine in its own subprocess on the same prompts, prints one
table and writes bench/results/<device>-<date>.json (one row per engine and workload).

    python bench/throughput.py                           # workloads A and B, every engine
    python bench/throughput.py --workloads A --engines hpcinfer,transformers --profile

Workloads (issue 8):
  A  Llama-3.2-1B shape, bf16, 256 prompts x 256 random input ids, 256 output tokens each
  B  Llama-3.1-8B shape, bf16, 1000 prompts, seeded ShareGPT-like lengths (in 16-1024,
     out 16-512)
  C  Qwen3-30B-A3B shape (MoE: 128 experts, top 8), bf16, B's 1000 ShareGPT-like prompts
     (bench/moe_workload.py; --layers N keeps N of its 48 layers)
  T  tiny Llama shape (hidden 64, 2 layers), 16 short prompts: CPU-sized, to run the TP/PP/DP
     plumbing without a GPU (--device cpu; bench/parallel_variants.py)
  P  Llama-3.1-8B shape, 2000 prompts = one shared 1,024-token system prompt (the same ids in
     every row) + a 64-token question of its own, 128 output tokens each (issue 22 item 4: the
     common batch job of many rows behind one long instruction; run with prefix caching on)
  L  Llama-3.1-70B shape, W4A16 only (BENCH_QUANTIZATION=awq or gptq; bf16 would not fit one
     GPU), 256 prompts of B's ShareGPT-like lengths, 256 sequences
Quantized runs (issue 20, hpcinfer only): BENCH_QUANTIZATION=fp8 quantizes the bf16 checkpoint
online; BENCH_QUANTIZATION=awq / gptq builds a W4A16 model from config.json with
load_format="dummy" (random packed weights; no 4-bit checkpoint is written);
BENCH_KV_CACHE_DTYPE=fp8 stores the KV cache in e4m3; BENCH_LOAD_FORMAT=dummy (or
--load-format dummy) skips writing the bf16 checkpoint too. awq is the W4A16 default of
tests/gpu/quant_checks.sh: AWQ and GPTQ without desc_act become the same kernel layout at load
(one group per K step); GPTQ with desc_act adds a g_idx lookup per k.
All requests ignore EOS, so every engine produces exactly the requested tokens.

vLLM side by side (issue 22): --engines hpcinfer,vllm,transformers --processes 3 runs every
engine in its own subprocess, once per process index (engines interleaved: hpcinfer 0, vllm 0,
transformers 0, hpcinfer 1, ...), on the same checkpoint directory and prompt token ids. Each
process warms up on other prompts (seed 1) first, clears its prefix cache
(reset_prefix_cache()) before each timed rep (--reps) and times the generate call alone;
start-up (the constructor) and, for vLLM, `import vllm` are reported on their own. vLLM runs
with its own defaults (max_num_seqs, max_num_batched_tokens, prefix caching on) except
max_model_len, which is ours, skip_tokenizer_init=True, TokensPrompt prompts and
SamplingParams(temperature=0, max_tokens=N, min_tokens=N, ignore_eos=True, detokenize=False),
with VLLM_USE_FLASHINFER_SAMPLER=0 in its environment (../shared/recipes/vllm-peer.md).
hpcinfer gets the same prompts and max_tokens=N, ignore_eos=True, detokenize=False; its
min_tokens stays 0 (with ignore_eos and no stop tokens it bans nothing, and min_tokens > 0
takes our sampler off its plain-greedy path), and the worker checks that every prompt got
exactly N tokens. Printed: every process's output tok/s, the median per engine, and the
first-token agreement between engines (share of prompts whose first generated token is
equal). An engine that is not importable is skipped with one line. --device cpu (workload
T) runs the same machinery without a GPU.
Multi-GPU: --tp N / --pp N / --dp N run bench/parallel_variants.py (TP=1 baseline first).

pct_of_bandwidth_bound: output tok/s over the tok/s of an ideal engine that streams the
weights once per decode step, reads each token's whole KV context once, at the measured
device-to-device copy bandwidth, plus the prefill matmul FLOPs at the measured bf16 matmul
rate. Its decode steps are those of ideal continuous batching (a request admitted as soon as
one of max_num_seqs slots frees; once all are admitted the batch drains and the longest
output sets the step count; a MoE step reads the experts its batch hits).
pct_of_flat_bound: the same over the earlier form (until 2026-12-05), which counted
num_out / max_num_seqs steps, all full: it overstates the bound of a draining batch
(workloads B and C: all prompts start together, so an ideal engine runs as many steps as the
longest output, 512, where the flat form counts ~230).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_file import append_rows  # bench/results_file.py (this script's directory)
from gc_pauses import gc_pauses  # bench/gc_pauses.py
from cpu_placement import Placement, topology  # bench/cpu_placement.py

from moe_workload import (MOE_SHAPES, decode_batch_sizes, is_moe, moe_bound_output_tok_s,
                          moe_config_dict, moe_layer_tensors)

from hpcinfer.testing.llama_shapes import SHAPES

log = logging.getLogger("bench.throughput")
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GiB = 2 ** 30

WORKLOADS = {
    "A": dict(shape="llama-3.2-1b", num_prompts=256, max_num_seqs=256,
              max_num_batched_tokens=8192),
    # B: 1024 sequences (all 1000 prompts admitted at once) gave 12,230-12,253 output tok/s
    # vs 11,165 at 512 and 11,859 at 768 in one H100 run (docs/performance.md).
    "B": dict(shape="llama-3.1-8b", num_prompts=1000, max_num_seqs=1024,
              max_num_batched_tokens=8192),
    "C": dict(shape="qwen3-30b-a3b", num_prompts=1000, max_num_seqs=1024,
              max_num_batched_tokens=8192),
    "T": dict(shape="tiny", num_prompts=16, max_num_seqs=8, max_num_batched_tokens=8192),
    "L": dict(shape="llama-3.1-70b", num_prompts=256, max_num_seqs=256,
              max_num_batched_tokens=8192),
    # P: issue 22's shared-prompt job (1,088-token prompts, 8 admitted per 8192-token step).
    "P": dict(shape="llama-3.1-8b", num_prompts=2000, max_num_seqs=1024,
              max_num_batched_tokens=8192, prefix_caching=True),
}
P_SYSTEM_TOKENS, P_QUESTION_TOKENS, P_OUTPUT_TOKENS = 1024, 64, 128
# Engines whose import name differs from the engine name (transformers-batch).
ENGINE_MODULES = {"hpcinfer": "hpcinfer", "transformers": "transformers",
                  "transformers-batch": "transformers", "vllm": "vllm"}
W4A16_METHODS = ("awq", "gptq")
ENGINES = ("hpcinfer", "transformers", "transformers-batch", "vllm")


# --- checkpoints -------------------------------------------------------------------------

def write_checkpoint(out_dir: Path, shape: dict, *, seed: int = 0, layers: int | None = None,
                     max_position_embeddings: int = 131072, shard_bytes: int = 4 * GiB,
                     lm_head_std: float | None = None) -> Path:
    """A random Llama checkpoint of ``shape`` (bf16), written shard by shard; returns out_dir.

    Weights: linear layers N(0, 1/fan_in), embeddings N(0, 1), norms around 1 (so logits are
    peaked and greedy decoding is stable under rounding). Generated on the GPU when there is
    one (16 GB for the 8B shape), one tensor at a time, so host memory holds one shard."""
    import torch
    from safetensors.torch import save_file

    from hpcinfer.testing.llama_shapes import llama_config_dict, write_word_tokenizer
    out_dir = Path(out_dir)
    cfg = dict(shape)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    marker = out_dir / "bench_shape.json"
    want = json.dumps({"cfg": cfg, "seed": seed, "max_pos": max_position_embeddings,
                       "lm_head_std": lm_head_std},
                      sort_keys=True)
    if marker.is_file() and marker.read_text() == want:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std
                ).to(torch.bfloat16).cpu()

    def norm(size=h):
        return (1.0 + 0.1 * torch.randn(size, generator=gen, device=device)
                ).to(torch.bfloat16).cpu()

    def tensors():
        yield "model.embed_tokens.weight", randn(vocab, h)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", norm()
            yield p + "post_attention_layernorm.weight", norm()
            for name, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h),
                                     ("o_proj", h, q)):
                yield p + f"self_attn.{name}.weight", randn(rows, cols, std=cols ** -0.5)
            if is_moe(cfg):   # workload C (bench/moe_workload.py)
                yield from moe_layer_tensors(p, cfg, randn, norm)
                continue
            for name, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h),
                                     ("down_proj", h, inter)):
                yield p + f"mlp.{name}.weight", randn(rows, cols, std=cols ** -0.5)
        yield "model.norm.weight", norm()
        if not cfg["tie_word_embeddings"]:
            yield "lm_head.weight", randn(vocab, h, std=lm_head_std or h ** -0.5)

    weight_map, shard, shard_size, names = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        for key in shard:
            weight_map[key] = name
        shard, shard_size = {}, 0

    total = 0
    for key, tensor in tensors():
        shard[key] = tensor
        shard_size += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_size >= shard_bytes:
            flush()
    if shard:
        flush()
    # Rename to the HF pattern now that the shard count is known.
    final = {}
    for i, name in enumerate(names):
        new = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (out_dir / name).rename(out_dir / new)
        final[name] = new
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = (moe_config_dict if is_moe(cfg) else llama_config_dict)(
        cfg, max_position_embeddings=max_position_embeddings)
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    write_word_tokenizer(out_dir, cfg["vocab_size"])
    marker.write_text(want)
    return out_dir


# --- workloads ---------------------------------------------------------------------------

def make_requests(workload: str, num_prompts: int | None = None, seed: int = 0
                  ) -> list[tuple[list[int], int]]:
    """[(prompt token ids, output length)], seeded; ids avoid the top special range."""
    rng = np.random.default_rng(seed)
    spec = WORKLOADS[workload]
    n = num_prompts or spec["num_prompts"]
    vocab = shape_of(spec["shape"])["vocab_size"]
    if workload == "A":
        lens_in, lens_out = np.full(n, 256), np.full(n, 256)
    elif workload == "T":
        lens_in, lens_out = rng.integers(4, 24, n), rng.integers(4, 12, n)
    elif workload == "P":
        system = rng.integers(0, 128000, P_SYSTEM_TOKENS).tolist()
        return [(system + rng.integers(0, 128000, P_QUESTION_TOKENS).tolist(), P_OUTPUT_TOKENS)
                for _ in range(n)]
    else:
        # ShareGPT-like: long-tailed prompts (median ~220) and answers (median ~190).
        lens_in = np.clip(rng.lognormal(np.log(220), 0.9, n), 16, 1024).astype(int)
        lens_out = np.clip(rng.lognormal(np.log(190), 0.8, n), 16, 512).astype(int)
    return [(rng.integers(0, 128000, int(li)).tolist(), int(lo))
            for li, lo in zip(lens_in, lens_out)]


def shape_of(name: str, layers: int | None = None) -> dict:
    """A dense (llama_shapes) or MoE (moe_workload) shape, optionally with fewer layers."""
    shape = dict(SHAPES.get(name) or MOE_SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return shape


def max_model_len_for(requests) -> int:
    longest = max(len(p) + o for p, o in requests)
    return -(-longest // 16) * 16


# --- bounds ------------------------------------------------------------------------------

def measure_device_rates() -> dict:
    """Device-to-device copy bandwidth (read + written bytes / s) and bf16 matmul FLOP/s."""
    import torch
    x = torch.empty(2 * GiB // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    bandwidth = 2 * x.numel() * 2 / float(np.median(times))
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 2 * 8192 ** 3 / float(np.median(times))
    return {"copy_bytes_per_s": bandwidth, "matmul_flops": flops,
            "device": torch.cuda.get_device_name(0)}


def bound_output_tok_s(shape: dict, requests, max_num_seqs: int, rates: dict,
                       quantization: str | None = None, kv_cache_dtype: str = "auto", *,
                       flat: bool = False) -> float:
    """``quantization`` fp8 / awq / gptq: the decoder projections stream 1 / 0.5625 bytes a
    weight (4-bit codes plus an int32 zero and fp32 scale per 128) instead of 2; fp8 KV cache:
    1 byte an element. Prefill FLOPs at the bf16 rate either way. Decode steps: as many as an
    ideal continuous-batching engine runs (moe_workload.decode_batch_sizes: the batch drains
    once every request is admitted); ``flat``: the earlier count, num_out / max_num_seqs,
    which assumes every step full and so overstates the bound of a draining batch."""
    if is_moe(shape):
        return moe_bound_output_tok_s(shape, requests, max_num_seqs, rates, flat=flat)
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    layers, heads, kv_heads = (shape["num_hidden_layers"], shape["num_attention_heads"],
                               shape["num_key_value_heads"])
    head_dim = h // heads
    layer_params = 2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * inter
    params = layers * layer_params + vocab * h * (1 if shape["tie_word_embeddings"] else 2)
    linear_bytes = {"fp8": 1.0, "awq": 0.5625, "gptq": 0.5625}.get(quantization or "", 2.0)
    weight_bytes = 2 * (params - layers * layer_params) + linear_bytes * layers * layer_params
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * (1 if kv_cache_dtype != "auto"
                                                             else 2)
    num_out = sum(o for _, o in requests)
    decode_steps = (-(-num_out // max_num_seqs) if flat
                    else len(decode_batch_sizes(requests, max_num_seqs)))
    # every output token reads its whole context (prompt + earlier outputs) once
    kv_read = sum(o * len(p) + o * (o - 1) / 2 for p, o in requests) * kv_bytes_per_token
    num_in = sum(len(p) for p, _ in requests)
    matmul_params = params - vocab * h    # the embedding lookup is no matmul
    prefill_flops = 2 * num_in * matmul_params
    seconds = ((decode_steps * weight_bytes + kv_read) / rates["copy_bytes_per_s"]
               + prefill_flops / rates["matmul_flops"])
    return num_out / seconds


# --- engines (each in its own subprocess) ------------------------------------------------

class StepTimeline:
    """Per-step kinds and times of a timed run (--step-breakdown): where the wall time goes.

    A CUDA event is recorded as each step is launched (ModelRunner.run); the interval from one
    step's event to the next one's is that step's share of the GPU timeline (its kernels plus
    any idle gap before the next launch), so the intervals add up to the run's wall time less
    the host time before the first launch. Kinds, by the scheduled rows: ``tail`` (fewer than
    25% of max_num_seqs sequences), ``prefill`` (no one-token rows), ``mixed`` (prefill chunks
    and one-token rows), ``decode_full`` (max_num_seqs one-token rows), ``decode_partial``.
    A prefill chunk of exactly one token counts as a decode row (rare)."""

    KINDS = ("prefill", "mixed", "decode_full", "decode_partial", "tail")

    def __init__(self, engine, max_num_seqs: int):
        import torch
        self._torch = torch
        self.max_num_seqs = max_num_seqs
        # per step: (scheduled seqs, decode rows, prefill tokens, sampled tokens)
        self.steps: list[tuple[int, int, int, int]] = []
        self.events = []
        self._last = None
        scheduler, runner = engine.scheduler, engine.runner
        schedule, run = scheduler.schedule, runner.run

        def timed_schedule():
            self._last = schedule()
            return self._last

        def timed_run(batch):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            out = self._last
            decode = sum(1 for n in out.num_new_tokens if n == 1)
            self.steps.append((len(out.seqs), decode, sum(out.num_new_tokens) - decode,
                               len(batch.sample_seqs)))
            self.events.append(event)
            return run(batch)

        scheduler.schedule, runner.run = timed_schedule, timed_run   # instance attributes

    def reset(self) -> None:
        self.steps, self.events = [], []

    def kind(self, seqs: int, decode: int, prefill: int) -> str:
        if seqs < 0.25 * self.max_num_seqs:
            return "tail"
        if decode == 0:
            return "prefill"
        if prefill:
            return "mixed"
        return "decode_full" if seqs >= self.max_num_seqs else "decode_partial"

    def summary(self, wall_s: float) -> dict:
        """Call after the run's final synchronize."""
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        marks = self.events + [end]
        out = {k: {"steps": 0, "s": 0.0, "prefill_tokens": 0, "decode_rows": 0,
                   "sampled_tokens": 0} for k in self.KINDS}
        for i, (seqs, decode, prefill, sampled) in enumerate(self.steps):
            row = out[self.kind(seqs, decode, prefill)]
            row["steps"] += 1
            row["s"] += marks[i].elapsed_time(marks[i + 1]) / 1e3
            row["prefill_tokens"] += prefill
            row["decode_rows"] += decode
            row["sampled_tokens"] += sampled
        for row in out.values():
            row["ms_per_step"] = 1e3 * row["s"] / row["steps"] if row["steps"] else None
            row["s"] = round(row["s"], 3)
        timeline = sum(r["s"] for r in out.values())
        out["total"] = {"steps": len(self.steps), "timeline_s": round(timeline, 3),
                        "wall_s": round(wall_s, 3),
                        "before_first_launch_s": round(wall_s - timeline, 3)}
        return out


def print_step_breakdown(breakdown: dict) -> None:
    fmt = "{:<15} {:>6} {:>8} {:>8} {:>10} {:>10} {:>10}"
    print(fmt.format("step kind", "steps", "s", "ms/step", "prefill tok", "decode rows",
                     "sampled"), flush=True)
    for kind in StepTimeline.KINDS:
        r = breakdown[kind]
        print(fmt.format(kind, r["steps"], f"{r['s']:.2f}",
                         f"{r['ms_per_step']:.2f}" if r["ms_per_step"] else "-",
                         r["prefill_tokens"], r["decode_rows"], r["sampled_tokens"]), flush=True)
    print("step timeline:", json.dumps(breakdown["total"]), flush=True)


def sampling_overrides() -> dict:
    """BENCH_SAMPLING (JSON): SamplingParams fields over the greedy defaults, the same for
    every engine's timed rows, e.g. '{"temperature": 0.8, "top_p": 0.95,
    "repetition_penalty": 1.1}' for a job that samples (engines seeded with 0). Rows record
    it as ``sampling``."""
    text = os.environ.get("BENCH_SAMPLING", "")
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"BENCH_SAMPLING={text!r} is not JSON ({e}); give SamplingParams "
                         'fields, e.g. {"temperature": 0.8}') from None
    if not isinstance(value, dict):
        raise SystemExit(f"BENCH_SAMPLING={text!r}: give a JSON object of SamplingParams fields")
    return value


def run_hpcinfer(ckpt: Path, requests, max_num_seqs: int, profile_dir: Path | None,
                 workload: str = "", llm_kwargs: dict | None = None,
                 device: str = "cuda", max_num_batched_tokens: int = 8192,
                 step_breakdown: bool = False, warm_requests=None, reps: int = 1,
                 prefix_caching: bool = False) -> dict:
    """llm_kwargs (tensor_parallel_size, ...) and device: bench/parallel_variants.py.
    warm_requests: the warm-up prompts (default: the first 256 timed ones); reps: timed runs,
    each after reset_prefix_cache() when prefix_caching is on (the row's numbers are their
    median, every rep's output tok/s is kept)."""
    import torch
    import hpcinfer
    from hpcinfer import LLM, SamplingParams, TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(str(ckpt), dtype="bfloat16", max_model_len=max_model_len_for(requests),
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
              gpu_memory_utilization=0.9, enable_prefix_caching=prefix_caching, device=device,
              **{"async_scheduling": os.environ.get("BENCH_ASYNC", "1") == "1",
                 # BENCH_QUANTIZATION=fp8: online FP8 of the bf16 checkpoint (issue 20)
                 "quantization": os.environ.get("BENCH_QUANTIZATION") or None,
                 "kv_cache_dtype": os.environ.get("BENCH_KV_CACHE_DTYPE") or "auto",
                 # dummy: random weights from config.json (W4A16 runs, workload L)
                 "load_format": os.environ.get("BENCH_LOAD_FORMAT") or "auto",
                 **(llm_kwargs or {})})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    startup_s = time.perf_counter() - t0
    engine = llm.llm_engine
    runner = engine.runner
    if os.environ.get("BENCH_SPLIT_ATTENTION") == "0":   # A/B switch for mixed steps
        runner.split_mixed_attention = False
    graphs = runner.graphs
    print(f"hpcinfer start-up (load + profile + graph capture): {startup_s:.1f} s "
          f"(graphs {graphs.capture_s if graphs else 0:.1f} s); KV pool {runner.num_blocks} "
          f"blocks = {runner.num_blocks * runner.bytes_per_block() / GiB:.2f} GiB", flush=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    # min_tokens stays 0: with ignore_eos and no stop tokens it would ban nothing, and
    # min_tokens > 0 keeps a row off the sampler's plain-greedy path (module docstring).
    overrides = sampling_overrides()
    params = [SamplingParams(**{**dict(temperature=0, max_tokens=o, ignore_eos=True,
                                       detokenize=False), **overrides})
              for _, o in requests]
    # Warm-up: Triton compiles the prefill kernels for the argument specialisations a run
    # meets (mixed prefill + decode steps included); graphs were captured at start-up.
    t1 = time.perf_counter()
    warm = ([TokensPrompt(prompt_token_ids=p) for p, _ in warm_requests]
            if warm_requests is not None else prompts[:256])
    llm.generate(warm, [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                       detokenize=False)] * len(warm), use_tqdm=False)
    sync()
    warmup_s = time.perf_counter() - t1
    rep_tok_s, walls, rep_gc, rep_cpu = [], [], [], []
    allocator_before = _allocator_counts(device)
    profiler = None
    if os.environ.get("BENCH_CPROFILE") == "1":   # host hot spots of the timed run
        import cProfile
        profiler = cProfile.Profile()
    for _ in range(reps):
        if prefix_caching:
            llm.reset_prefix_cache()   # every rep starts from an empty prefix cache
        stats_before = _stats_dict(engine.stats)
        hits_before = engine.block_manager.prefix_cache_hits if prefix_caching else 0
        queries_before = engine.block_manager.prefix_cache_queries if prefix_caching else 0
        timeline = StepTimeline(engine, max_num_seqs) if step_breakdown else None
        if profiler is not None:   # the last rep's host hot spots
            profiler.clear()
            profiler.enable()
        with gc_pauses() as pauses, Placement() as placement:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            sync()
            wall = time.perf_counter() - start
        rep_cpu.append({**placement.summary, "gpu_sm_clock_mhz": _sm_clock(device)})
        if profiler is not None:
            profiler.disable()
        rep_gc.append(pauses)
        rep_tok_s.append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
        walls.append(wall)
    # The reported run: the median rep (the last one's outputs, stats and timeline).
    wall = float(np.median(walls))
    allocator = {k: v - allocator_before[k] for k, v in _allocator_counts(device).items()}
    print("caching allocator during the reps:", json.dumps(allocator), flush=True)
    if profiler is not None:
        import pstats
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    stats = {k: v - stats_before.get(k, 0) for k, v in _stats_dict(engine.stats).items()}
    print("host breakdown (s):", json.dumps({k: round(v, 3) for k, v in stats.items()}),
          flush=True)
    if runner.num_shared_prefix_steps:
        print(f"decode steps over a shared prefix (warm-up and reps): "
              f"{runner.num_shared_prefix_steps}", flush=True)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    row = _row(sum(map(len, tokens)), requests, wall, startup_s)
    row.update(_exactness(tokens, requests))
    row.update(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
               num_preemptions=engine.num_preemptions, engine_version=hpcinfer.__version__,
               reps=reps, rep_output_tok_s=rep_tok_s, enable_prefix_caching=prefix_caching,
               gc_pauses=rep_gc,
               # the step loop's CPU per rep (bench/cpu_placement.py): for the A spread
               cpu_placement={**topology(), "reps": rep_cpu})
    if prefix_caching:   # of the last rep's prompt tokens, the share found in the cache
        queries = engine.block_manager.prefix_cache_queries - queries_before
        hits = engine.block_manager.prefix_cache_hits - hits_before
        row["prefix_cache_hit_rate"] = hits / queries if queries else None
    if timeline is not None:
        row["step_breakdown"] = timeline.summary(wall)
        print_step_breakdown(row["step_breakdown"])
    row.update(warmup_s=warmup_s, host_breakdown_s=stats, allocator_during_reps=allocator,
               graph_capture_s=graphs.capture_s if graphs else None,
               graph_replays=graphs.num_replays if graphs else 0,
               split_mixed_steps=graphs.num_splits if graphs else 0,
               split_attention_steps=graphs.num_split_attention if graphs else 0,
               # all reps together (engine/shared_prefix.py; 0 with it off)
               shared_prefix_steps=runner.num_shared_prefix_steps,
               async_scheduling=engine.config.async_scheduling,
               split_mixed_attention=getattr(runner, "split_mixed_attention", None),
               kv_blocks=runner.num_blocks,
               kv_gib=runner.num_blocks * runner.bytes_per_block() / GiB)
    if profile_dir is not None:
        row["profile"] = profile_hpcinfer(llm, prompts, profile_dir, workload)
        row["decode_profile"] = profile_decode(llm, prompts, profile_dir, workload)
    return row


def _exactness(tokens: list[list[int]], requests) -> dict:
    """Whether every prompt got exactly its requested tokens, and each prompt's first
    generated token (for the agreement between engines; the driver does not store it)."""
    short = sum(1 for t, (_, o) in zip(tokens, requests) if len(t) != o)
    if short:
        print(f"WARNING: {short} of {len(requests)} prompts did not get exactly their "
              "requested tokens", flush=True)
    return {"exact_tokens": short == 0 and len(tokens) == len(requests),
            "first_tokens": [int(t[0]) if len(t) else None for t in tokens]}


def run_vllm(ckpt: Path, requests, warm_requests, reps: int = 1,
             prefix_caching: bool | None = None) -> dict:
    """vLLM's offline LLM on the same checkpoint and prompt ids (written from vLLM's
    documented API; see the module docstring). prefix_caching None: vLLM's default (on)."""
    t_import = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:   # older layouts export it at the top only
        from vllm import TokensPrompt
    import_s = time.perf_counter() - t_import
    print(f"vllm {vllm.__version__}: import {import_s:.1f} s", flush=True)
    kwargs = dict(model=str(ckpt), dtype="bfloat16", max_model_len=max_model_len_for(requests),
                  skip_tokenizer_init=True, gpu_memory_utilization=0.9, seed=0)
    if prefix_caching is not None:
        kwargs["enable_prefix_caching"] = prefix_caching
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    print(f"vllm start-up (LLM constructor): {startup_s:.1f} s", flush=True)

    overrides = sampling_overrides()

    def params(n: int):
        return SamplingParams(**{**dict(temperature=0, max_tokens=n, min_tokens=n,
                                        ignore_eos=True, detokenize=False), **overrides})

    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    sampling = [params(o) for _, o in requests]
    t1 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in warm_requests],
                 [params(4)] * len(warm_requests), use_tqdm=False)
    warmup_s = time.perf_counter() - t1
    walls, rep_tok_s, outs = [], [], []
    for _ in range(reps):
        llm.reset_prefix_cache()   # every rep starts from an empty prefix cache
        start = time.perf_counter()
        outs = llm.generate(prompts, sampling, use_tqdm=False)   # returns when all are done
        wall = time.perf_counter() - start
        walls.append(wall)
        rep_tok_s.append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    row = _row(sum(map(len, tokens)), requests, float(np.median(walls)), startup_s)
    row.update(_exactness(tokens, requests))
    row.update(import_s=import_s, warmup_s=warmup_s, engine_version=vllm.__version__,
               reps=reps, rep_output_tok_s=rep_tok_s,
               enable_prefix_caching=True if prefix_caching is None else prefix_caching)
    scheduler = _vllm_scheduler_config(llm)
    if scheduler:
        row.update(scheduler)
    return row


def _vllm_scheduler_config(llm) -> dict:
    """vLLM's effective max_num_seqs / max_num_batched_tokens, where its config is reachable
    (the attribute path has moved between versions: best effort, {} otherwise)."""
    for path in (("llm_engine", "vllm_config", "scheduler_config"),
                 ("llm_engine", "scheduler_config")):
        obj = llm
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None:
            return {k: getattr(obj, k) for k in ("max_num_seqs", "max_num_batched_tokens")
                    if isinstance(getattr(obj, k, None), int)}
    return {}


def profile_decode(llm, prompts, out_dir: Path, workload: str, steps: int = 32) -> dict:
    """Decode steps alone, at a full batch: prefill max_num_seqs prompts first, then profile
    ``steps`` pure decode steps. Per step: wall ms, GPU kernel ms, host phases, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from hpcinfer import SamplingParams
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    ids = [f"decode-profile-{i}" for i in range(min(len(prompts), engine.config.max_num_seqs))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.scheduler.waiting or not engine.stats.last_step.get("is_decode"):
        engine.step(final_only=True)
    torch.cuda.synchronize()
    before = _stats_dict(engine.stats)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step(final_only=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    host = {k: (v - before[k]) / steps * 1e3 for k, v in _stats_dict(engine.stats).items()
            if k.endswith("_s")}
    engine.abort_request(ids)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    top = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=20)
    (out_dir / f"profile_decode_{workload}.txt").write_text(table)
    summary = {"batch": len(ids), "step_ms": wall / steps * 1e3, "gpu_ms_per_step": gpu_ms,
               "gpu_busy_pct": 100 * gpu_ms / (wall / steps * 1e3),
               "host_ms_per_step": {k: round(v, 3) for k, v in host.items()},
               "top_kernels": [{"name": e.key[:80], "ms_per_step": e.self_device_time_total
                                / 1e3 / steps, "count_per_step": e.count / steps}
                               for e in top[:12]]}
    print("decode profile:", json.dumps(summary, indent=1), flush=True)
    return summary


def _sm_clock(device: str) -> int | None:
    """The GPU's SM clock now (MHz, through NVML), None without one: a power-capped or cooling
    GPU shows here when one process's reps are slower than another's."""
    if device != "cuda":
        return None
    try:
        import torch
        return int(torch.cuda.clock_rate())
    except Exception:   # no NVML (pynvml) on this machine
        return None


def _allocator_counts(device: str) -> dict:
    """The CUDA caching allocator's counters that mean a host stall: cudaMalloc/cudaFree
    calls (a cudaFree waits for the device) and allocations retried after freeing the cache
    (the pool was full). A steady run's reps should add none."""
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    if device != "cuda":
        return dict.fromkeys(keys, 0)
    import torch
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in keys}


def _stats_dict(stats) -> dict:
    return {k: getattr(stats, k) for k in ("num_steps", "num_decode_steps", "schedule_s",
                                           "prepare_s", "model_s", "sample_s", "postprocess_s")}


def profile_hpcinfer(llm, prompts, out_dir: Path, workload: str) -> dict:
    """torch.profiler over a short run (all prompts, 48 tokens): GPU busy %, top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from hpcinfer import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_hpcinfer_{workload}.txt").write_text(table)
    top = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    summary = {"wall_s": wall, "gpu_busy_pct": 100 * busy_us / 1e6 / wall,
               "top_kernels": [{"name": e.key[:80], "self_device_ms": e.self_device_time_total
                                / 1e3, "count": e.count} for e in top[:10]]}
    print(f"profile: wall {wall:.2f} s, GPU busy {summary['gpu_busy_pct']:.0f}%", flush=True)
    print(table, flush=True)
    return summary


def run_transformers(ckpt: Path, requests, batch_size: int, device: str = "cuda",
                     warm_requests=None) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map=device)
    model.eval()
    model.generation_config.eos_token_id = None   # ignore EOS
    sync()
    load_s = time.perf_counter() - t0

    def generate(batch, first=None):
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, _) in enumerate(batch):   # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(o for _, o in batch)
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
        if first is not None:
            first.extend(out[:, width].tolist())
        return out.shape[1] - width

    warm = warm_requests if warm_requests is not None else requests
    generate(warm[:8])   # warm-up
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    first_sorted: list[int] = []
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        generate([requests[i] for i in order[b:b + batch_size]], first_sorted)
    sync()
    wall = time.perf_counter() - start
    # Only the requested tokens count (static batches generate up to the longest request).
    num_out = sum(o for _, o in requests)
    row = _row(num_out, requests, wall, load_s)
    first = [0] * len(requests)
    for i, token in zip(order, first_sorted):
        first[i] = int(token)
    row.update(batch_size=batch_size, first_tokens=first, exact_tokens=True,
               engine_version=transformers.__version__)
    return row


def run_transformers_batch(ckpt: Path, requests) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    t0 = time.perf_counter()
    model = None
    # transformers 5.x before 5.23 names the paged kernel "paged|sdpa"; later plain "sdpa".
    for attn in ("paged|sdpa", "sdpa"):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16,
                                                         attn_implementation=attn,
                                                         device_map="cuda").eval()
            break
        except (ValueError, KeyError) as e:
            log.info("attn_implementation=%s: %s", attn, e)
    if not hasattr(model, "generate_batch"):
        return {"skipped": "transformers has no generate_batch"}
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    new = max(o for _, o in requests)
    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    model.generate_batch([p for p, _ in requests[:8]], generation_config=config)  # warm-up
    start = time.perf_counter()
    outs = model.generate_batch([p for p, _ in requests], generation_config=config)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    num_out = sum(len(o.generated_tokens) for o in outs.values())
    return _row(num_out, requests, wall, load_s)


def _row(num_out: int, requests, wall: float, load_s: float) -> dict:
    import torch
    on_gpu = torch.cuda.is_available()   # (CPU: the tiny plumbing run of parallel_variants)
    free, total = torch.cuda.mem_get_info() if on_gpu else (0, 0)
    num_in = sum(len(p) for p, _ in requests)
    return {"output_tok_s": num_out / wall, "total_tok_s": (num_out + num_in) / wall,
            "wall_s": wall, "load_s": load_s, "num_output_tokens": num_out,
            "num_input_tokens": num_in, "peak_gpu_mem_gib": (total - free) / GiB,
            "torch_max_reserved_gib": torch.cuda.max_memory_reserved() / GiB if on_gpu else 0}


def worker_main(args) -> None:
    spec = WORKLOADS[args.workload]
    requests = make_requests(args.workload, args.num_prompts)
    ckpt = Path(args.ckpt)
    options = json.loads(args.parallel) if args.parallel else {}  # bench/parallel_variants.py
    replica, num_replicas = options.pop("shard", (0, 1))
    requests = requests[replica::num_replicas]
    # Warm-up prompts: the workload's shape, other ids (seed 1; for P another system prompt).
    warm = make_requests(args.workload, min(256, len(requests)), seed=1)
    caching = prefix_caching_for(args.workload, args.prefix_caching)
    if args.worker == "hpcinfer":
        options.setdefault("device", args.device)
        row = run_hpcinfer(ckpt, requests, args.max_num_seqs or spec["max_num_seqs"],
                           Path(args.profile_dir) if args.profile_dir else None, args.workload,
                           max_num_batched_tokens=(args.max_num_batched_tokens
                                                   or spec["max_num_batched_tokens"]),
                           step_breakdown=args.step_breakdown, warm_requests=warm,
                           reps=args.reps, prefix_caching=bool(caching), **options)
    elif args.worker == "vllm":
        # None: vLLM's own default (prefix caching on) unless --prefix-caching says otherwise
        row = run_vllm(ckpt, requests, warm, args.reps,
                       None if args.prefix_caching == "auto" else caching)
    elif args.worker == "transformers":
        row = run_transformers(ckpt, requests, args.hf_batch_size, args.device, warm)
    elif args.worker == "transformers-batch":
        row = run_transformers_batch(ckpt, requests)
    else:
        raise SystemExit(f"unknown engine {args.worker}")
    Path(args.result_file).write_text(json.dumps(row))


# --- driver ------------------------------------------------------------------------------

def importable_env() -> dict:
    """Environment for the engine subprocesses. Where hpcinfer is not pip-installed (a bare
    GPU machine), a shim dir maps kernels/ to hpcinfer.kernels as pyproject's package-dir
    does."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    probe = subprocess.run([sys.executable, "-c", "import hpcinfer.kernels.reference"],
                           capture_output=True, cwd="/")
    if probe.returncode == 0:
        return env
    shim = Path(tempfile.mkdtemp(prefix="hpcinfer-shim-"))
    (shim / "hpcinfer").mkdir()
    for child in (REPO / "hpcinfer").iterdir():
        (shim / "hpcinfer" / child.name).symlink_to(child)
    (shim / "hpcinfer" / "kernels").symlink_to(REPO / "kernels")
    env["PYTHONPATH"] = f"{shim}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def prefix_caching_for(workload: str, choice: str = "auto") -> bool:
    """hpcinfer's prefix caching: on / off, or auto = the workload's (on for P only)."""
    if choice == "auto":
        return bool(WORKLOADS[workload].get("prefix_caching", False))
    return choice == "on"


def engine_importable(engine: str) -> bool:
    """Whether the engine's package can be imported here (found on sys.path / PYTHONPATH),
    without importing it (import vllm alone takes 12-14 s)."""
    import importlib.util
    try:
        return importlib.util.find_spec(ENGINE_MODULES.get(engine, engine)) is not None
    except (ImportError, ValueError):
        return False


def first_token_agreement(a: list, b: list) -> float | None:
    """Share of prompts whose first generated token is the same in both lists."""
    if not a or len(a) != len(b):
        return None
    return sum(1 for x, y in zip(a, b) if x is not None and x == y) / len(a)


def summarize(rows: list[dict], first_tokens: dict, measured=()) -> None:
    """Every process's output tok/s and the median per engine and workload; the first-token
    agreement between engines (each engine's first process; pairs with at least one engine
    of ``measured``, the others' tokens come from an earlier run)."""
    fmt = "{:<19} {:>3} {:>11} {:>10} {:>9}  {}"
    print(fmt.format("engine", "wl", "median out", "start-up s", "import s",
                     "every process's output tok/s"), flush=True)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["engine"]), []).append(r)
    for (workload, engine), group in groups.items():
        ok = [r for r in group if r.get("output_tok_s")]
        each = ", ".join(f"{r['output_tok_s']:.0f}" if r.get("output_tok_s") else "error"
                         for r in group)
        if not ok:
            print(fmt.format(engine, workload, "error", "", "", each), flush=True)
            continue
        imports = [r["import_s"] for r in ok if r.get("import_s") is not None]
        print(fmt.format(engine, workload,
                         f"{np.median([r['output_tok_s'] for r in ok]):.0f}",
                         f"{np.median([r['load_s'] for r in ok]):.1f}",
                         f"{np.median(imports):.1f}" if imports else "-", each), flush=True)
    for workload in dict.fromkeys(w for w, _ in first_tokens):
        engines = [e for w, e in first_tokens if w == workload]
        for i, a in enumerate(engines):
            for b in engines[i + 1:]:
                if a not in measured and b not in measured:
                    continue
                share = first_token_agreement(first_tokens[workload, a],
                                              first_tokens[workload, b])
                text = "n/a (different prompt counts)" if share is None else (
                    f"{share:.1%} of {len(first_tokens[workload, a])} prompts")
                print(f"first-token agreement on {workload}: {a} vs {b}: {text}", flush=True)


def device_slug(name: str) -> str:
    return "-".join(name.lower().replace("_", " ").split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="A,B")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (parallel_variants)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (parallel_variants)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (parallel_variants)")
    p.add_argument("--combine", action="store_true", help="one tp x pp x dp layout instead of "
                   "each size on its own")
    p.add_argument("--device", default="cuda", help="cpu: tiny plumbing run (--workloads T)")
    p.add_argument("--processes", type=int, default=1,
                   help="run every engine in this many processes (one subprocess each, "
                   "engines interleaved); every process's number is printed and stored")
    p.add_argument("--reps", type=int, default=1,
                   help="timed runs in each process, prefix cache cleared before each")
    p.add_argument("--prefix-caching", default="auto", choices=("auto", "on", "off"),
                   help="auto: hpcinfer on for workload P only, vLLM its default (on)")
    p.add_argument("--ckpt-root", default=os.path.join(tempfile.gettempdir(), "hpcinfer-bench"))
    p.add_argument("--out", default=str(RESULTS), help="results dir")
    p.add_argument("--num-prompts", type=int, help="override the workload's prompt count")
    p.add_argument("--layers", type=int, help="keep this many layers of the shape (disk/time)")
    p.add_argument("--hf-batch-size", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="torch profiler summary (hpcinfer)")
    p.add_argument("--label", default="", help="free text stored with every row")
    p.add_argument("--max-num-seqs", type=int, help="hpcinfer: override the workload's")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="hpcinfer: override the workload's (8192)")
    p.add_argument("--step-breakdown", action="store_true",
                   help="hpcinfer: time per step kind (prefill, mixed, decode, tail)")
    p.add_argument("--load-format", default=os.environ.get("BENCH_LOAD_FORMAT") or "auto",
                   choices=("auto", "dummy"), help="dummy: no checkpoint is written, the "
                   "engine builds random weights from config.json (hpcinfer only); implied by "
                   "BENCH_QUANTIZATION=awq/gptq and workload L")
    # internal: one engine in a subprocess
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    p.add_argument("--parallel", help=argparse.SUPPRESS)   # JSON from parallel_variants
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        worker_main(args)
        return
    if (args.tp, args.pp, args.dp) != (1, 1, 1):
        import parallel_variants  # bench/parallel_variants.py (this script's directory)
        parallel_variants.main(args, sys.modules[__name__])
        return
    if args.processes < 1 or args.reps < 1:
        raise SystemExit("--processes and --reps: 1 or more")
    env = importable_env()
    if args.device == "cuda":
        import torch
        rates = measure_device_rates()
        device = rates["device"]
        print(f"device {device}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 "
              f"matmul {rates['matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    else:   # the tiny plumbing run: no bound, Triton kernels interpreted
        import platform
        rates, device = None, f"cpu-{platform.machine()}"
        env["TRITON_INTERPRET"] = "1"
    date = dt.date.today().isoformat()
    rows = []
    first_tokens: dict[tuple[str, str], list] = {}   # (workload, engine): process 0's
    engines = []
    for e in (e.strip() for e in args.engines.split(",") if e.strip()):
        if e not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {e!r} (known: {', '.join(ENGINES)})")
        if engine_importable(e):
            engines.append(e)
        else:
            print(f"{e}: not importable here (no {ENGINE_MODULES[e]} package); skipped",
                  flush=True)
    quant = os.environ.get("BENCH_QUANTIZATION") or None
    kv_dtype = os.environ.get("BENCH_KV_CACHE_DTYPE") or "auto"
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        spec = WORKLOADS[workload]
        shape = shape_of(spec["shape"], args.layers)
        requests = make_requests(workload, args.num_prompts)
        t0 = time.perf_counter()
        ckpt, load_format = model_dir_for(workload, shape, Path(args.ckpt_root), quant,
                                          args.load_format)
        env["BENCH_LOAD_FORMAT"] = load_format
        if rates:   # the checkpoint was generated on the GPU: give its blocks back for the
            torch.cuda.empty_cache()   # engines' memory checks (vLLM's asks for 90% free)
        if load_format == "dummy" and any(e != "hpcinfer" for e in engines):
            print(f"load_format=dummy: only hpcinfer runs (no weights for the others); "
                  f"skipping {', '.join(e for e in engines if e != 'hpcinfer')}", flush=True)
        print(f"workload {workload}: checkpoint {ckpt} ready in {time.perf_counter() - t0:.1f} s"
              f"; {len(requests)} prompts, {sum(len(q) for q, _ in requests)} input and "
              f"{sum(o for _, o in requests)} output tokens", flush=True)
        # First tokens of engines run earlier on this workload with this ckpt-root (the GPU
        # machine's two-call side by side: hpcinfer in call 1, vLLM in call 2).
        earlier_file = Path(args.ckpt_root) / f"first-tokens-{workload}-{len(requests)}.json"
        earlier = json.loads(earlier_file.read_text()) if earlier_file.is_file() else {}
        for engine, firsts in earlier.items():
            if engine not in engines:
                first_tokens[workload, engine] = firsts
                print(f"first tokens of {engine} on {workload}: from an earlier run "
                      f"({earlier_file})", flush=True)
        bound_args = (shape, requests, args.max_num_seqs or spec["max_num_seqs"], rates, quant,
                      kv_dtype)
        bound = bound_output_tok_s(*bound_args) if rates else None
        flat_bound = bound_output_tok_s(*bound_args, flat=True) if rates else None
        for process, engine in ((i, e) for i in range(args.processes) for e in engines):
            if load_format == "dummy" and engine != "hpcinfer":
                continue
            base = {"engine": engine, "workload": workload, "tp": args.tp, "device": device,
                    "process": process, "processes": args.processes,
                    "date": date, "model_shape": spec["shape"], "dtype": "bfloat16",
                    "quantization": quant if engine == "hpcinfer" else None,
                    "kv_cache_dtype": kv_dtype if engine == "hpcinfer" else "auto",
                    "load_format": load_format,
                    "num_layers": shape["num_hidden_layers"],
                    "num_prompts": len(requests), "label": args.label,
                    "bound_output_tok_s": bound, "flat_bound_output_tok_s": flat_bound,
                    # (transformers stays greedy: BENCH_SAMPLING is for hpcinfer and vLLM)
                    "sampling": sampling_overrides() or None}
            result_file = Path(tempfile.mkstemp(suffix=".json")[1])
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine,
                   "--workload", workload, "--ckpt", str(ckpt), "--result-file",
                   str(result_file), "--hf-batch-size", str(args.hf_batch_size),
                   "--device", args.device, "--reps", str(args.reps),
                   "--prefix-caching", args.prefix_caching]
            if args.num_prompts:
                cmd += ["--num-prompts", str(args.num_prompts)]
            for flag, value in (("--max-num-seqs", args.max_num_seqs),
                                ("--max-num-batched-tokens", args.max_num_batched_tokens)):
                if value:
                    cmd += [flag, str(value)]
            if args.step_breakdown:
                cmd.append("--step-breakdown")
            if args.profile and engine == "hpcinfer":
                cmd += ["--profile-dir", args.out]
            print(f"--- {engine} on workload {workload}, process {process + 1} of "
                  f"{args.processes}", flush=True)
            start = time.perf_counter()
            # flashinfer is not shipped with the GPU machine's vLLM (vllm-peer.md)
            proc = subprocess.run(cmd, env=(dict(env, VLLM_USE_FLASHINFER_SAMPLER="0")
                                            if engine == "vllm" else env))
            text = result_file.read_text() if result_file.stat().st_size else ""
            result_file.unlink()
            if proc.returncode != 0 and text:   # measured, then failed at shutdown
                print(f"{engine} on {workload}: exit {proc.returncode} after writing its "
                      "result (kept)", flush=True)
            if not text:
                print(f"{engine} on {workload}: failed (exit {proc.returncode}) after "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                row = {**base, "error": f"exit {proc.returncode}", "output_tok_s": None,
                       "total_tok_s": None}
                rows.append(row)
                _save([row], Path(args.out), device, date)  # now: a later engine may hang
                continue
            result = json.loads(text)
            if "skipped" in result:
                print(f"{engine}: {result['skipped']}; skipped", flush=True)
                continue
            result["pct_of_bandwidth_bound"] = (100 * result["output_tok_s"] / bound
                                                if bound else None)
            result["pct_of_flat_bound"] = (100 * result["output_tok_s"] / flat_bound
                                           if flat_bound else None)
            result["startup_s"] = result["load_s"]   # the constructor (import not included)
            firsts = result.pop("first_tokens", None)
            if firsts is not None:
                if process == 0:
                    first_tokens[workload, engine] = firsts
                    earlier[engine] = firsts
                    earlier_file.write_text(json.dumps(earlier))
                if engine != "hpcinfer" and (workload, "hpcinfer") in first_tokens:
                    result["first_token_agreement_vs_hpcinfer"] = first_token_agreement(
                        first_tokens[workload, "hpcinfer"], firsts)
            row = {**base, **result}
            rows.append(row)
            # Saved and printed as each engine finishes, so a run cut off by a time limit
            # keeps what it measured.
            _save([row], Path(args.out), device, date)
            imported = (f", import {result['import_s']:.1f} s" if result.get("import_s")
                        is not None else "")
            print(f"=== {engine} on {workload}, process {process + 1}: "
                  f"{result['output_tok_s']:.0f} output tok/s, {result['total_tok_s']:.0f} "
                  f"total tok/s, wall {result['wall_s']:.2f} s, start-up "
                  f"{result['load_s']:.1f} s{imported}", flush=True)
    _print_table(rows)
    summarize(rows, first_tokens, engines)


def model_dir_for(workload: str, shape: dict, root: Path, quantization: str | None,
                  load_format: str) -> tuple[Path, str]:
    """(model directory, load format) of a workload: a written bf16 checkpoint, or for
    W4A16 (awq / gptq), workload L and --load-format dummy a config.json + tokenizer only."""
    from hpcinfer.testing.llama_shapes import write_dummy_model
    w4a16 = quantization in W4A16_METHODS
    if workload == "L" and not w4a16:
        raise SystemExit("workload L (Llama-3.1-70B shape) runs W4A16 only on one GPU: set "
                         "BENCH_QUANTIZATION=awq (or gptq); bf16 weights need 141 GB")
    if quantization not in (None, "fp8", *W4A16_METHODS):
        raise SystemExit(f"BENCH_QUANTIZATION={quantization}: use fp8 (online), awq or gptq")
    name = WORKLOADS[workload]["shape"]
    if w4a16 or load_format == "dummy" or workload == "L":
        if is_moe(shape) and w4a16:
            raise SystemExit(f"BENCH_QUANTIZATION={quantization}: workload C (MoE) runs bf16 "
                             "or fp8 only")
        suffix = f"-{quantization}" if w4a16 else ""
        config = (moe_config_dict(shape, max_position_embeddings=131072) if is_moe(shape)
                  else None)
        return write_dummy_model(root / f"{name}{suffix}-dummy", shape,
                                 max_position_embeddings=131072,
                                 quantization=quantization if w4a16 else None,
                                 config=config), "dummy"
    return write_checkpoint(root / name, shape), "auto"


def _print_table(rows) -> None:
    fmt = "{:<19} {:>3} {:>12} {:>12} {:>8} {:>10} {:>9} {:>8}"
    print(fmt.format("engine", "wl", "out tok/s", "total tok/s", "load s", "peak GiB", "% bound",
                     "x HF"))
    hf = {r["workload"]: r["output_tok_s"] for r in rows
          if r["engine"] == "transformers" and r.get("output_tok_s")}
    for r in rows:
        if r.get("output_tok_s") is None:
            print(fmt.format(r["engine"], r["workload"], "error", "", "", "", "", ""))
            continue
        ratio = r["output_tok_s"] / hf[r["workload"]] if r["workload"] in hf else float("nan")
        pct = r.get("pct_of_bandwidth_bound")
        print(fmt.format(r["engine"], r["workload"], f"{r['output_tok_s']:.0f}",
                         f"{r['total_tok_s']:.0f}", f"{r['load_s']:.1f}",
                         f"{r['peak_gpu_mem_gib']:.1f}", "-" if pct is None else f"{pct:.0f}",
                         f"{ratio:.1f}"))


def _save(rows, out_dir: Path, device: str, date: str) -> None:
    path = append_rows(out_dir / f"{device_slug(device)}-{date}.json", rows, indent=1)
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
