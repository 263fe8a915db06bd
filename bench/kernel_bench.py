"""Microbenchmarks of the Triton kernels on a GPU: time, achieved bandwidth, peers.

    python bench/kernel_bench.py [--out PATH] [--quick]

Times with triton.testing.do_bench (median, CUDA events) and writes a JSON list of rows
{kernel, shape, dtype, ms, gb_s, device, date, ...} to
bench/results/kernels-<device>-<date>.json (or --out). ``gb_s`` counts the fewest bytes the
kernel must move (each input read once, each output written once), so it compares directly
with the ``device_copy`` row (a large device-to-device copy, bytes read + written), the
practical ceiling. ``peer_ms`` is a torch baseline where one exists (eager reference ops;
contiguous, non-paged SDPA for prefill).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("bench.kernels")
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/...)")
    parser.add_argument("--quick", action="store_true", help="bf16 only")
    parser.add_argument("--sweep", action="store_true",
                        help="also time alternative tile configs (bf16), each checked first")
    parser.add_argument("--only", help="comma-separated bench names, e.g. decode_mix")
    parser.add_argument("--quant-models", help="quant_gemm rows for these shapes only: "
                        "8B, 70B or 8B,70B (default both)")
    args = parser.parse_args()
    if args.quant_models:
        global QUANT_MODELS
        QUANT_MODELS = tuple(args.quant_models.split(","))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_bench.py needs a CUDA GPU (the interpreter would time numpy)")
    device_name = torch.cuda.get_device_name(0)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    rows = []
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    benches = [bench_copy, bench_decode, bench_prefill, bench_cache, bench_elementwise,
               bench_moe, bench_quant_gemm, bench_lora]
    if args.sweep:
        benches += [sweep_decode, sweep_prefill, sweep_moe]
    if args.only:
        wanted = set(args.only.split(","))
        benches = [f for f in (bench_copy, bench_decode, bench_prefill, bench_cache,
                               bench_elementwise, sweep_decode, sweep_prefill, bench_decode_mix,
                               bench_decode_shared, sweep_decode_shared, bench_moe, sweep_moe,
                               sweep_moe_parts,
                               bench_quant_gemm, sweep_w4a16,
                               bench_lora, sweep_lora_tiles, bench_lora_parts, bench_blas)
                   if f.__name__.removeprefix("bench_").removeprefix("sweep_") in wanted
                   or f.__name__ in wanted]
    for bench in benches:
        for row in bench(dtypes):
            # The common bench-row keys (bench/README: engine ... date); a kernel has no tok/s.
            row.update(engine="hpcinfer-kernels",
                       workload=f"{row['kernel']} {row['shape']} {row['dtype']}", tp=1,
                       output_tok_s=None, total_tok_s=None, device=device_name, date=date)
            rows.append(row)
            log.info(_format(row))
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or RESULTS / f"kernels-{slug}-{date}.json"
    if out.is_dir():
        out = out / f"kernels-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([_finite(row) for row in rows], indent=1) + "\n")
    print(f"\n{device_name}, {date}, torch {torch.__version__}, triton {_triton_version()}")
    print(f"{'kernel':<22} {'shape':<44} {'dtype':<9} {'ms':>9} {'GB/s':>7} {'peer ms':>8}")
    for row in rows:
        print(_format(row))
    print(f"wrote {out}")


def _finite(row: dict) -> dict:
    # JSON has no NaN/Infinity: a config that failed or was skipped gets null.
    return {k: (None if isinstance(v, float) and v != v or v in (float("inf"),) else v)
            for k, v in row.items()}


def _format(row: dict) -> str:
    peer = f"{row['peer_ms']:8.4f}" if row.get("peer_ms") is not None else " " * 8
    gb_s = f"{row['gb_s']:7.0f}" if row.get("gb_s") is not None else " " * 7
    extra = f"  {row['tflops']:.0f} TFLOP/s" if row.get("tflops") else ""
    if "config" in row:
        extra += f"  {row['config']} err={row['rel_err']:.1e}"
    if row.get("speedup"):
        extra += f"  {row['speedup']:.1f}x the torch reference, err={row['rel_err']:.1e}"
    if row.get("graph_ms"):
        extra += f"  graph {row['graph_ms']:.4f} ms = {row['graph_gb_s']:.0f} GB/s"
    return (f"{row['kernel']:<22} {row['shape']:<44} {row['dtype']:<9} {row['ms']:9.4f} "
            f"{gb_s} {peer}{extra}")


def _triton_version() -> str:
    import triton
    return triton.__version__


def time_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row(kernel, shape, dtype, ms, num_bytes=None, peer_ms=None, **extra) -> dict:
    gb_s = None if num_bytes is None else num_bytes / ms / 1e6
    return dict(kernel=kernel, shape=shape, dtype=_name(dtype), ms=ms, gb_s=gb_s,
                peer_ms=peer_ms, **extra)


def bench_copy(dtypes):
    src = torch.empty(512 * 2**20, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    yield _row("device_copy", "1 GiB (read + write)", torch.bfloat16, ms, 2 * src.nbytes)


def bench_decode(dtypes):
    from hpcinfer.kernels.decode_attention import paged_decode_attention
    from hpcinfer.kernels.random_batch import make_paged_batch
    cases = [(256, 512, 32, 8, 128), (256, 512, 32, 8, 64), (8, 8192, 32, 8, 128),
             (64, 2048, 64, 8, 128)]
    for dtype in dtypes:
        for num_seqs, ctx, heads, kv_heads, head_dim in cases:
            if dtype != torch.bfloat16 and (num_seqs, ctx, head_dim) != (256, 512, 128):
                continue
            b = make_paged_batch([ctx] * num_seqs, [1] * num_seqs, num_heads=heads,
                                 num_kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                                 dtype=dtype, device="cuda", poison=False)
            out = torch.empty_like(b.q)
            ms = time_ms(lambda: paged_decode_attention(b.q, b.k_cache, b.v_cache,
                                                        b.block_tables, b.seq_lens, 0.1,
                                                        out=out))
            kv_bytes = 2 * num_seqs * ctx * kv_heads * head_dim * b.k_cache.element_size()
            num_bytes = kv_bytes + 2 * b.q.nbytes + b.block_tables.nbytes
            shape = f"{num_seqs}x{ctx} ctx, h{heads}/kv{kv_heads}, d{head_dim}, bs16"
            yield _row("decode_attention", shape, dtype, ms, num_bytes)
            del b, out


def bench_decode_mix(dtypes):
    """Decode steps as the engine's graphs launch them: mixed lengths, grid sized by the
    block table's capacity (max_seqlen_k), each split-K partition size (None = default)."""
    import numpy as np
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.decode_attention import paged_decode_attention
    from hpcinfer.kernels.random_batch import make_paged_batch
    rng = np.random.default_rng(0)
    cases = [  # name, lengths, capacity (the workload's max_model_len)
        ("A 256 seqs", rng.integers(257, 512, 256).tolist(), 512),
        ("B 512 seqs", np.clip(rng.lognormal(np.log(300), 0.8, 512), 17, 1535).astype(int)
         .tolist(), 1536),
    ]
    # Workload B's full decode batch (1000 rows, prompt + half the output), with the KV cache
    # in bf16 and in e4m3 (kv_cache_dtype="fp8": half the bytes, converted in the kernel).
    b_lens = [len(p) + o // 2 for p, o in _b_requests()]
    cases += [("B 1000 seqs", b_lens, 1536), ("B 1000 seqs, e4m3 cache", b_lens, 1536)]
    for name, lens, capacity in cases:
        b = make_paged_batch(lens, [1] * len(lens), num_heads=32, num_kv_heads=8,
                             head_dim=128 if name.startswith("B") else 64, block_size=16,
                             dtype=torch.bfloat16, device="cuda", poison=False)
        kv_bytes = 2
        if name.endswith("e4m3 cache"):
            b.k_cache = b.k_cache.to(torch.float8_e4m3fn)
            b.v_cache = b.v_cache.to(torch.float8_e4m3fn)
            kv_bytes = 1
        out = torch.empty_like(b.q)
        expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                    b.seq_lens, 0.1)
        num_bytes = 2 * sum(lens) * 8 * b.q.shape[2] * kv_bytes + 2 * b.q.nbytes
        partitions = ((None, 256, 512, 1024, 2048) if not name.startswith("B 1000")
                      else (None, 512, 2048))
        for partition_size in partitions:
            def run(p=partition_size):
                return paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                              b.seq_lens, 0.1, out=out, max_seqlen_k=capacity,
                                              partition_size=p)
            err = _rel_err(run(), expected)
            yield _row("decode_attention:mix", f"{name}, mean ctx {np.mean(lens):.0f}, "
                       f"capacity {capacity}", torch.bfloat16, time_ms(run), num_bytes,
                       config=dict(partition_size=partition_size), rel_err=err)
        del b, out


def _b_requests():
    """bench/throughput.py's workload B requests ([(prompt ids, output length)])."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import make_requests
    return make_requests("B")


def _p_decode_step():
    """Workload P's decode step of one layer: 1,024 rows behind one 1,024-token prompt (64
    shared blocks) plus 1-192 tokens of their own, the Llama-3.1-8B layer shape, grid by P's
    capacity (1,216 keys). -> (batch, out, shape text, bytes a row-by-row kernel asks for,
    run(shared_prefix_len) -> out)."""
    import numpy as np
    from hpcinfer.kernels import decode_attention as mod
    from hpcinfer.kernels.random_batch import make_paged_batch
    rng = np.random.default_rng(0)
    shared, capacity = 1024, 1216
    lens = (shared + rng.integers(1, 193, 1024)).tolist()
    b = make_paged_batch(lens, [1] * len(lens), num_heads=32, num_kv_heads=8, head_dim=128,
                         block_size=16, dtype=torch.bfloat16, device="cuda", poison=False)
    b.block_tables[:, :shared // 16] = b.block_tables[0, :shared // 16]
    out = torch.empty_like(b.q)
    shape = "P 1024 rows, 1024 shared + 1-192 own, h32/kv8, d128"
    # (the shared part mostly hits L2)
    num_bytes = 2 * sum(lens) * 8 * 128 * 2 + 2 * b.q.nbytes

    def run(prefix=0):
        return mod.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                          b.seq_lens, 0.1, out=out, max_seqlen_k=capacity,
                                          shared_prefix_len=prefix)
    return b, out, shape, num_bytes, run


def bench_decode_shared(dtypes):
    """The same batch (_p_decode_step) without and with ``shared_prefix_len``
    (kernels/decode_attention.py: the shared blocks attended once for all rows); rel_err of
    the shared launch against the plain one."""
    shared = 1024
    b, out, shape, num_bytes, run = _p_decode_step()
    plain = run().clone()
    plain_ms = time_ms(run)
    yield _row("decode_attention:shared", shape, torch.bfloat16, plain_ms, num_bytes,
               config=dict(shared_prefix_len=0), rel_err=0.0)
    err = _rel_err(run(shared), plain)
    ms = time_ms(lambda: run(shared))
    yield _row("decode_attention:shared", shape, torch.bfloat16, ms, num_bytes,
               config=dict(shared_prefix_len=shared), rel_err=err, vs_plain=plain_ms / ms)
    del b, out


def sweep_decode_shared(dtypes):
    """Tiles of the shared-prefix kernel (shared_prefix_config) on P's decode step: each
    variant times the whole launch (shared keys once, each row's own keys, the merge)."""
    from hpcinfer.kernels import decode_attention as mod
    b, out, shape, num_bytes, run = _p_decode_step()
    expected = run().clone()
    variants = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in
                [(64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2),
                 (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3),
                 (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2)]]
    yield from _sweep("decode_attention:shared", shape, mod, "shared_prefix_config", variants,
                      lambda: run(1024), expected, num_bytes)
    del b, out


def bench_prefill(dtypes):
    from hpcinfer.kernels.prefill_attention import paged_attention
    from hpcinfer.kernels.random_batch import make_paged_batch
    num_seqs, q_len, heads, kv_heads, head_dim = 8, 512, 32, 8, 128
    for dtype in dtypes:
        b = make_paged_batch([q_len] * num_seqs, [q_len] * num_seqs, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=head_dim, block_size=16,
                             dtype=dtype, device="cuda", poison=False)
        out = torch.empty_like(b.q)
        ms = time_ms(lambda: paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q,
                                             b.seq_lens, b.block_tables, 0.1, out=out,
                                             max_seqlen_q=q_len))
        # Causal: half of the q_len x q_len score matrix, two matmuls of 2 flops per MAC.
        flops = 2 * 2 * num_seqs * heads * q_len * q_len * head_dim / 2
        q4 = b.q.view(num_seqs, q_len, heads, head_dim).transpose(1, 2).contiguous()
        k4 = torch.randn(num_seqs, kv_heads, q_len, head_dim, device="cuda", dtype=dtype)
        peer_ms = time_ms(lambda: F.scaled_dot_product_attention(q4, k4, k4, is_causal=True,
                                                                 enable_gqa=True))
        num_bytes = 2 * b.q.nbytes + 2 * num_seqs * q_len * kv_heads * head_dim * \
            b.k_cache.element_size()
        shape = f"{num_seqs}x{q_len} tok causal, h{heads}/kv{kv_heads}, d{head_dim}"
        yield _row("prefill_attention", shape, dtype, ms, num_bytes, peer_ms,
                   tflops=flops / ms / 1e9, peer="torch sdpa, contiguous KV")


def bench_cache(dtypes):
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.cache import reshape_and_cache
    num_tokens, kv_heads, head_dim = 8192, 8, 128
    for dtype in dtypes:
        k = torch.randn(num_tokens, kv_heads, head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        caches = [torch.empty(4096, 16, kv_heads, head_dim, device="cuda", dtype=dtype)
                  for _ in range(2)]
        slots = torch.randperm(4096 * 16, device="cuda")[:num_tokens]
        ms = time_ms(lambda: reshape_and_cache(k, v, *caches, slots))
        peer = time_ms(lambda: reference.reshape_and_cache(k, v, *caches, slots))
        yield _row("reshape_and_cache", f"{num_tokens} tok, kv{kv_heads}, d{head_dim}", dtype,
                   ms, 4 * k.nbytes + slots.nbytes, peer)


def bench_elementwise(dtypes):
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.activation import silu_and_mul
    from hpcinfer.kernels.norm import rms_norm
    from hpcinfer.kernels.rotary import rotary_embedding
    num_tokens = 8192
    for dtype in dtypes:
        x = torch.randn(num_tokens, 4096, device="cuda", dtype=dtype)
        res = torch.randn_like(x)
        w = torch.randn(4096, device="cuda", dtype=dtype)
        ms = time_ms(lambda: rms_norm(x, w, 1e-6, res))
        peer = time_ms(lambda: reference.rms_norm(x, w, 1e-6, res))
        yield _row("rms_norm+residual", f"{num_tokens}x4096", dtype, ms, 4 * x.nbytes, peer)

        qkv = torch.randn(num_tokens, 48, 128, device="cuda", dtype=dtype)
        q, k = qkv[:, :32], qkv[:, 32:40]
        pos = torch.randint(0, 4096, (num_tokens,), device="cuda")
        cos_sin = torch.randn(4096, 128, device="cuda")
        ms = time_ms(lambda: rotary_embedding(pos, q, k, cos_sin))
        peer = time_ms(lambda: reference.rotary_embedding(pos, q, k, cos_sin))
        moved = 2 * (q.numel() + k.numel()) * q.element_size() + num_tokens * 128 * 4
        yield _row("rotary_embedding", f"{num_tokens} tok, h32+kv8, d128", dtype, ms, moved, peer)

        gate_up = torch.randn(num_tokens, 2 * 14336, device="cuda", dtype=dtype)
        ms = time_ms(lambda: silu_and_mul(gate_up))
        peer = time_ms(lambda: reference.silu_and_mul(gate_up))
        yield _row("silu_and_mul", f"{num_tokens}x(2x14336)", dtype, ms,
                   gate_up.nbytes * 3 // 2, peer)
        del x, res, qkv, gate_up


# Qwen3-30B-A3B's MoE layer (workload C): hidden 2048, 128 experts of intermediate 768, top 8.
MOE_SHAPE = dict(hidden=2048, inter=768, experts=128, top_k=8)


def _moe_problem(num_tokens: int, dtype: torch.dtype):
    from hpcinfer.kernels import moe_reference
    h, i, e, k = (MOE_SHAPE[n] for n in ("hidden", "inter", "experts", "top_k"))
    x = torch.randn(num_tokens, h, device="cuda", dtype=dtype)
    w_gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype) * h ** -0.5
    w_down = torch.randn(e, h, i, device="cuda", dtype=dtype) * i ** -0.5
    logits = torch.randn(num_tokens, e, device="cuda")
    weights, ids = moe_reference.select_experts(logits, k, scoring="softmax_topk",
                                                renormalize=True)
    # The fewest bytes: every expert hit read once, x read and the output written once.
    num_hit = int(torch.unique(ids).numel())
    num_bytes = (num_hit * 3 * i * h + 2 * num_tokens * h) * x.element_size()
    return (x, w_gate_up, w_down, weights, ids), num_bytes


def bench_moe(dtypes):
    """Fused MoE (Triton) vs the torch reference's per-expert loop, Qwen3-30B-A3B layer.

    ``ms`` is an eager call (the ~35 small torch ops that sort the pairs launch from the
    host, which dominates at decode sizes); ``graph_ms`` replays the same call captured in a
    CUDA graph, as the engine's decode steps run it."""
    from hpcinfer.kernels import moe_reference
    from hpcinfer.kernels.fused_moe import fused_experts
    for num_tokens in (1, 16, 64, 256, 1024, 8192):
        args, num_bytes = _moe_problem(num_tokens, torch.bfloat16)
        ms = time_ms(lambda: fused_experts(*args))
        graph_ms = time_ms(_captured(lambda: fused_experts(*args)))
        peer = time_ms(lambda: moe_reference.fused_experts(*args))
        err = _rel_err(fused_experts(*args), moe_reference.fused_experts(*args))
        shape = (f"{num_tokens} tok, h{MOE_SHAPE['hidden']}, {MOE_SHAPE['experts']}x"
                 f"i{MOE_SHAPE['inter']}, top{MOE_SHAPE['top_k']}")
        yield _row("fused_moe", shape, torch.bfloat16, ms, num_bytes, peer,
                   speedup=peer / ms, rel_err=err, graph_ms=graph_ms,
                   graph_gb_s=num_bytes / graph_ms / 1e6)


def _captured(fn):
    """fn captured in a CUDA graph (after a warm-up run that compiles); returns its replay."""
    from hpcinfer.testing.cuda_graphs import capture
    return capture(fn)[0].replay


def sweep_moe(dtypes):
    from hpcinfer.kernels import fused_moe, moe_reference
    variants = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
                for m, n, k, w, st in [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3),
                                       (16, 64, 128, 4, 3), (16, 128, 128, 8, 3),
                                       (16, 64, 128, 4, 4), (16, 64, 256, 4, 3),
                                       (16, 32, 128, 4, 4), (16, 128, 64, 4, 5),
                                       (32, 64, 64, 4, 4), (32, 64, 128, 4, 3),
                                       (64, 128, 64, 8, 3), (64, 64, 64, 4, 3),
                                       (128, 128, 64, 8, 3)]]
    # Decode sizes as CUDA-graph replays (as the engine runs them: eager launches of the
    # sort's small ops dominate there), the prefill size eagerly.
    for num_tokens in (64, 256, 512, 1024, 8192):
        args, num_bytes = _moe_problem(num_tokens, torch.bfloat16)
        expected = moe_reference.fused_experts(*args)
        yield from _sweep("fused_moe", f"{num_tokens} tok, Qwen3-30B-A3B layer", fused_moe,
                          "_moe_config", variants, lambda: fused_moe.fused_experts(*args),
                          expected, num_bytes, captured=num_tokens <= 1024)


# Per-GEMM launch variants of sweep_moe_parts: (BLOCK_N, BLOCK_K, num_warps, num_stages).
# The gate/up kernel's BLOCK_N counts intermediate columns (it computes gate and up tiles of
# that width, so vLLM's N 256 is our 128); the down kernel's counts hidden columns.
MOE_GATE_UP_VARIANTS = [(64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3),
                        (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                        (32, 128, 4, 4), (64, 256, 4, 2)]
MOE_DOWN_VARIANTS = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 3),
                     (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4), (256, 128, 8, 2),
                     (64, 256, 4, 2), (128, 256, 8, 2)]
# tokens -> BLOCK_M values tried (8192: a prefill chunk, where the layer ran at ~37% of the
# matmul rate on an H200, 2.16 ms; its pair sort stays the torch form, past ALIGN_MAX_PAIRS)
MOE_BLOCK_M = {64: (16, 32), 256: (16, 32, 64), 512: (32, 64), 1024: (64, 128),
               2048: (64, 128), 8192: (64, 128)}


def sweep_moe_parts(dtypes):
    """The fused MoE's pieces timed alone as CUDA-graph replays (the engine's decode steps),
    Qwen3-30B-A3B layer: the pair sort for each BLOCK_M (peer_ms: its torch form), then every
    gate/up and every down
    launch variant on those blocks (each checked against the current launch's output first),
    and the top-k sum. Logs the fastest combination per size; the rows keep every variant."""
    from hpcinfer.kernels import fused_moe as fm
    for num_tokens, block_ms in MOE_BLOCK_M.items():
        (x, wgu, wd, weights, ids), _ = _moe_problem(num_tokens, torch.bfloat16)
        e, h, i = wd.shape
        top_k = ids.shape[1]
        hit = int(torch.unique(ids).numel())
        default_up, default_down = fm.split_config(fm._moe_config(ids.numel(), e, 2))
        blocks0 = fm.align_pairs_to_blocks(ids, e, default_up["BLOCK_M"])
        want_h = fm.gate_up_pairs(x, wgu, None, blocks0, top_k, "silu", 1.702, 7.0, default_up)
        want_p = fm.down_pairs(want_h, wd, None, weights, blocks0, default_down)
        sum_ms = time_ms(_captured(lambda: fm.sum_pairs(want_p, ids, e)))
        shape = f"{num_tokens} tok, Qwen3-30B-A3B layer"
        yield _row("fused_moe:sum", shape, torch.bfloat16, sum_ms, want_p.nbytes)
        from hpcinfer.kernels import moe_reference, moe_router
        logits = torch.randn(num_tokens, e, device="cuda", dtype=torch.bfloat16)
        router = dict(scoring="softmax_topk", renormalize=True)
        yield _row("moe_router", shape, torch.bfloat16,
                   time_ms(_captured(lambda: moe_router.select_experts(logits, top_k,
                                                                       **router))),
                   peer_ms=time_ms(_captured(lambda: moe_reference.select_experts(
                       logits, top_k, **router))))
        best = []
        for bm in block_ms:
            blocks = fm.align_pairs_to_blocks(ids, e, bm)
            align_ms = time_ms(_captured(lambda: fm.align_pairs_to_blocks(ids, e, bm)))
            torch_ms = time_ms(_captured(lambda: fm.align_pairs_to_blocks_torch(ids, e, bm)))
            yield _row("fused_moe:align", shape, torch.bfloat16, align_ms, peer_ms=torch_ms,
                       config={"BLOCK_M": bm})
            parts = {}
            for part, variants, num_bytes in (
                    ("gate_up", MOE_GATE_UP_VARIANTS, 2 * hit * i * h * 2),
                    ("down", MOE_DOWN_VARIANTS, hit * i * h * 2)):
                for bn, bk, w, st in variants:
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                    if part == "gate_up":
                        def run(cfg=cfg):
                            return fm.gate_up_pairs(x, wgu, None, blocks, top_k, "silu", 1.702,
                                                    7.0, cfg)
                        want = want_h
                    else:
                        def run(cfg=cfg):
                            return fm.down_pairs(want_h, wd, None, weights, blocks, cfg)
                        want = want_p
                    try:
                        err = _rel_err(run(), want)
                        ms = time_ms(_captured(run)) if err < 2e-2 else float("nan")
                    except Exception as exc:   # shared memory or registers: record, go on
                        log.warning("moe %s %s failed: %s", part, cfg,
                                    str(exc).splitlines()[0][:200])
                        err, ms = float("inf"), float("nan")
                    if ms == ms:
                        parts.setdefault(part, []).append((ms, cfg))
                    yield _row(f"fused_moe:{part}:sweep", shape, torch.bfloat16, ms, num_bytes,
                               config=cfg, rel_err=err)
            if parts.get("gate_up") and parts.get("down"):
                up, down = min(parts["gate_up"], key=lambda t: t[0]), min(parts["down"],
                                                                          key=lambda t: t[0])
                best.append((align_ms + up[0] + down[0] + sum_ms, bm, up, down, align_ms))
        for total, bm, up, down, align_ms in sorted(best, key=lambda t: t[0]):
            log.info("moe parts %s: BLOCK_M %d total %.4f ms = align %.4f + gate_up %.4f %s + "
                     "down %.4f %s + sum %.4f", shape, bm, total, align_ms, up[0], up[1],
                     down[0], down[1], sum_ms)


# LoRA: (K, output pieces, model layer) of Llama-3.2-1B and Llama-3.1-8B's wrapped layers
LORA_SHAPES = [(2048, (2048, 512, 512), "1B qkv"), (2048, (2048,), "1B o"),
               (2048, (8192, 8192), "1B gate_up"), (8192, (2048,), "1B down"),
               (4096, (4096, 1024, 1024), "8B qkv"), (4096, (4096,), "8B o"),
               (4096, (14336, 14336), "8B gate_up"), (14336, (4096,), "8B down")]


def bench_lora(dtypes, num_adapters=4, rank=16):
    """Batched LoRA (shrink + expand, as one wrapped layer runs them) at decode batch sizes,
    rows spread evenly over ``num_adapters`` rank-``rank`` adapters, next to the base bf16
    GEMM of the same projection (peer_ms = F.linear). ``graph_ms``: the pair captured in a
    CUDA graph, as decode steps run it; ``lora_over_base`` = graph_ms / peer_ms."""
    from hpcinfer.kernels import lora, lora_reference
    for k, pieces, name in LORA_SHAPES:
        n, p = sum(pieces), len(pieces)
        bounds = tuple(sum(pieces[:i]) for i in range(p + 1))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        a = torch.randn(num_adapters, p * rank, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        b = torch.randn(num_adapters, n, rank, device="cuda", dtype=torch.bfloat16) * rank ** -0.5
        for m in (64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            slots = (torch.arange(m, device="cuda", dtype=torch.int32) % num_adapters)
            y = x @ w.t()

            def run():
                lora.lora_expand(y, lora.lora_shrink_partials(x, a, slots), b, slots, bounds)
            want = y.float().clone()
            lora_reference.lora_expand(want, lora_reference.lora_shrink(x.float(), a.float(),
                                                                        slots), b.float(),
                                       slots, bounds)
            got = y.clone()
            lora.lora_expand(got, lora.lora_shrink_partials(x, a, slots), b, slots, bounds)
            err = _rel_err(got.float() - y.float(), want - y.float())
            ms = time_ms(run)
            graph_ms = time_ms(_captured(run))
            peer = time_ms(lambda: F.linear(x, w))
            # the fewest bytes: each adapter's A and B read once, x read, y read and written
            num_bytes = (a.numel() + b.numel() + m * k + 2 * m * n) * 2
            yield _row("lora_shrink_expand", f"{m} tok, {name} K{k} N{n}, {num_adapters}x r{rank}",
                       torch.bfloat16, ms, num_bytes, peer, rel_err=err, graph_ms=graph_ms,
                       graph_gb_s=num_bytes / graph_ms / 1e6, lora_over_base=graph_ms / peer,
                       splits=lora.shrink_split(m, k))


def _lora_problem(k, pieces, m, num_adapters=4, rank=16):
    n, p = sum(pieces), len(pieces)
    a = torch.randn(num_adapters, p * rank, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    b = torch.randn(num_adapters, n, rank, device="cuda", dtype=torch.bfloat16) * rank ** -0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(m, device="cuda", dtype=torch.int32) % num_adapters
    bounds = tuple(sum(pieces[:i]) for i in range(p + 1))
    return x, a, b, slots, bounds


def sweep_lora_tiles(dtypes):
    """LoRA launch configs (``--only lora_tiles``): the shrink's (BLOCK_M, BLOCK_K, SPLIT,
    warps) with the default expand, then the expand's (BLOCK_M, BLOCK_N, warps) with the
    default shrink; each checked against the default's output, timed as CUDA-graph replays
    of the pair (eager timing would be the host's launch cost)."""
    from hpcinfer.kernels import lora as mod
    shrink_variants = [dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT=sp, num_warps=w)
                       for bm, bk, sp, w in [(64, 128, 8, 4), (64, 128, 4, 4), (64, 128, 16, 4),
                                             (32, 128, 8, 4), (16, 128, 8, 4), (64, 64, 8, 4),
                                             (64, 128, 8, 8), (32, 64, 16, 4), (64, 256, 4, 4),
                                             (32, 128, 4, 4), (16, 64, 16, 4), (128, 128, 4, 8)]]
    expand_variants = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
                       for bm, bn, w in [(64, 128, 4), (64, 64, 4), (64, 256, 8), (32, 128, 4),
                                         (16, 128, 4), (128, 128, 8), (32, 256, 4), (64, 128, 8),
                                         (128, 64, 4), (32, 64, 4), (16, 64, 4), (64, 256, 4)]]
    for k, pieces, name in LORA_SHAPES[:4]:
        for m in (64, 256):
            x, a, b, slots, bounds = _lora_problem(k, pieces, m)
            y0 = torch.zeros(m, sum(pieces), device="cuda", dtype=torch.bfloat16)
            y = y0.clone()

            def run():
                y.zero_()
                mod.lora_expand(y, mod.lora_shrink_partials(x, a, slots), b, slots, bounds)
                return y
            expected = run().float().clone()
            num_bytes = (a.numel() + b.numel() + m * k + 2 * m * sum(pieces)) * 2
            shape = f"{m} tok, {name} K{k} N{sum(pieces)}, 4x r16"
            for config_name, variants in (("_shrink_config", shrink_variants),
                                          ("_expand_config", expand_variants)):
                default = getattr(mod, config_name)
                try:
                    for cfg in variants:
                        setattr(mod, config_name, lambda *args, cfg=cfg: dict(cfg))
                        try:
                            err = _rel_err(run().float(), expected)
                            ms = time_ms(_captured(run)) if err < 2e-2 else float("nan")
                        except Exception as e:   # a config may not fit: record, go on
                            log.warning("lora %s %s failed: %s", config_name, cfg,
                                        str(e).splitlines()[0][:200])
                            err, ms = float("inf"), float("nan")
                        yield _row(f"lora{config_name.removesuffix('_config')}:sweep", shape,
                                   torch.bfloat16, ms, num_bytes, config=cfg, rel_err=err)
                finally:
                    setattr(mod, config_name, default)


def bench_lora_parts(dtypes):
    """Where a decode step's LoRA time goes (``--only lora_parts``), per 1B projection at 64
    and 256 rows, every time a CUDA-graph replay: the shrink + expand pair with rows
    interleaved over 4 adapters (as bench/lora.py spreads them) and with rows grouped by
    adapter; the shrink alone; the expand alone (from the shrink's split-K partials, and
    from one pre-summed partial); both with num_stages=1; two trivial launches (the floor of
    any pair); the base GEMM; the layer's whole work both ways (hpcinfer/lora/layers.py): the
    base GEMM + the pair, and the stacked GEMM + its expand. graph_ms is the timed column
    (``ms``)."""
    from hpcinfer.kernels import lora as mod
    for k, pieces, name in LORA_SHAPES[:4]:
        n = sum(pieces)
        for m in (64, 256):
            x, a, b, slots, bounds = _lora_problem(k, pieces, m)
            grouped = slots.sort().values
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
            y = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
            parts = mod.lora_shrink_partials(x, a, slots)
            summed = parts.sum(0, keepdim=True)
            tiny = torch.zeros(8, device="cuda")
            shape = f"{m} tok, {name} K{k} N{n}, 4x r16"
            w_stacked = torch.cat([w, a.reshape(-1, k)])   # hpcinfer/lora/layers.py "stacked"

            def base_and_pair():
                out = F.linear(x, w)
                mod.lora_expand(out, mod.lora_shrink_partials(x, a, slots), b, slots, bounds)

            def stacked():
                out = F.linear(x, w_stacked)
                mod.lora_expand_stacked(out[:, :n], out[:, n:], b, slots, bounds)
            variants = {
                "pair interleaved": lambda: mod.lora_expand(
                    y, mod.lora_shrink_partials(x, a, slots), b, slots, bounds),
                "pair grouped by adapter": lambda: mod.lora_expand(
                    y, mod.lora_shrink_partials(x, a, grouped), b, grouped, bounds),
                "shrink alone": lambda: mod.lora_shrink_partials(x, a, slots),
                f"expand alone ({parts.shape[0]} partials)": lambda: mod.lora_expand(
                    y, parts, b, slots, bounds),
                "expand alone (1 partial)": lambda: mod.lora_expand(y, summed, b, slots, bounds),
                "two trivial launches": lambda: (tiny.add_(1), tiny.add_(1)),
                "base GEMM (F.linear)": lambda: F.linear(x, w),
                "base GEMM + pair (separate shrink)": base_and_pair,
                "GEMM over [W; every slot's A] + stacked expand": stacked,
                "GEMM over [W; every slot's A] alone": lambda: F.linear(x, w_stacked),
            }
            for label, fn in variants.items():
                yield _row("lora_parts", f"{shape}: {label}", torch.bfloat16,
                           time_ms(_captured(fn)))
            shrink_cfg, expand_cfg = mod._shrink_config, mod._expand_config
            try:
                mod._shrink_config = lambda *args: dict(shrink_cfg(*args), num_stages=1)
                mod._expand_config = lambda *args: dict(expand_cfg(*args), num_stages=1)
                yield _row("lora_parts", f"{shape}: pair interleaved, num_stages=1",
                           torch.bfloat16, time_ms(_captured(variants["pair interleaved"])))
            except Exception as e:   # a config may not compile: record, go on
                log.warning("lora_parts num_stages=1 failed: %s", str(e).splitlines()[0][:200])
            finally:
                mod._shrink_config, mod._expand_config = shrink_cfg, expand_cfg


# (K, N, model) of the merged q/k/v, o, gate/up and down projections of Llama-3.1-8B and -70B
QUANT_SHAPES = [(4096, 6144, "8B qkv"), (4096, 4096, "8B o"), (4096, 28672, "8B gate_up"),
                (14336, 4096, "8B down"),
                (8192, 10240, "70B qkv"), (8192, 8192, "70B o"), (8192, 57344, "70B gate_up"),
                (28672, 8192, "70B down")]
QUANT_MS = (1, 16, 64, 256, 2048)      # decode batch sizes, then a prefill chunk
QUANT_MODELS = ("8B", "70B")           # --quant-models narrows QUANT_SHAPES


# (K, N, name) of the Llama-3.2-1B (workload A) projections and LM head, then Llama-3.1-8B's
BLAS_SHAPES = [(2048, 3072, "1B qkv"), (2048, 2048, "1B o"), (2048, 16384, "1B gate_up"),
               (8192, 2048, "1B down"), (2048, 128256, "1B lm_head"), *QUANT_SHAPES[:4]]


def bench_blas(dtypes):
    """``--only blas``: F.linear (bf16, CUDA-graph replays) at decode M = 64 / 256 and a
    1024-row step, with cuBLAS and with cuBLASLt (torch.backends.cuda.preferred_blas_library);
    ``peer_ms`` on the cuBLASLt row is cuBLAS's time. On an H200 (2026-12-05) the two were
    within noise everywhere, and the 1B projections took >= 10 us however small M was."""
    before = torch.backends.cuda.preferred_blas_library()
    try:
        for k, n, name in BLAS_SHAPES:
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
            for m in (64, 256, 1024):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                times = {}
                for lib in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(lib)
                    times[lib] = time_ms(_captured(lambda: F.linear(x, w)))
                    yield _row("blas", f"{m} tok, {name} K{k} N{n}: {lib}", torch.bfloat16,
                               times[lib], num_bytes=2 * (m * k + n * k + m * n),
                               peer_ms=times["cublas"] if lib == "cublaslt" else None,
                               tflops=2 * m * k * n / times[lib] / 1e9)
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def bench_quant_gemm(dtypes):
    """Quantized linears next to the bf16 GEMM of the same shape (peer_ms = F.linear bf16).
    Two kinds of row, so a run separates the GEMM from what surrounds it:

    * ``*_linear``: the whole call as the layer makes it (quant_method.apply minus reshapes):
      w4a16_linear (fused kernel below DEQUANT_MIN_M rows, dequantize + cuBLAS from it),
      fp8_linear (fp8_rowwise_linear: W8A16 up to W8A16_MAX_M, else the fused per-token
      quantization + _scaled_mm), fp8_block_linear (fused per-token-group quantization +
      the Triton block GEMM), and fp8_linear:torch_quant (the 2026-12-03 path: torch ops
      for the per-token quantization, then _scaled_mm) for comparison.
    * GEMM alone, activations already quantized: w4a16_gemm (the fused kernel at config_for's
      launch, every M), fp8_scaled_mm, fp8_block_gemm, fp8_w8a16_gemm (M <= 256), and
      fp8_quant (quantize_fp8 alone, per token)."""
    from hpcinfer.kernels import quant_reference as kref
    from hpcinfer.kernels.fp8_gemm import (fp8_block_gemm, fp8_rowwise_linear, fp8_scaled_mm,
                                           fp8_w8a16_gemm, quantize_fp8)
    from hpcinfer.kernels.w4a16_gemm import config_for, num_sms, w4a16_gemm, w4a16_linear
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    for k, n, model in QUANT_SHAPES:
        if model.split()[0] not in QUANT_MODELS:
            continue
        w = torch.randn(n, k, device="cuda") * k ** -0.5
        wb = w.bfloat16()
        codes = torch.randint(0, 16, (k, n), device="cuda")
        zeros = torch.full((k // 128, n), 8, dtype=torch.int32, device="cuda")
        scales = torch.rand(k // 128, n, device="cuda") * 0.01
        qweight = kref.pack_k(codes)
        del codes
        b_block_scales = w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3)) / 448
        b_block = (w / b_block_scales.repeat_interleave(128, 0)
                   .repeat_interleave(128, 1)).to(kref.FP8)
        row_scales = (w.abs().amax(dim=1) / 448).reshape(1, -1).contiguous()
        b_row = (w / row_scales.reshape(-1, 1)).to(kref.FP8)
        for m in QUANT_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            shape = f"M{m} K{k} N{n} ({model})"
            flops = 2 * m * n * k
            bf16_ms = time_ms(lambda: F.linear(x, wb))
            yield _row("bf16_gemm", shape, torch.bfloat16, bf16_ms,
                       (m * k + k * n + m * n) * 2, tflops=flops / bf16_ms / 1e9)
            w4_bytes = (m * k + m * n) * 2 + k * n // 2 + 8 * (k // 128) * n
            want = kref.w4a16_gemm(x, qweight, zeros, scales, None, 128)
            cfg = config_for(m, n, k, 128, False, num_sms(x.device))
            for name, fn in (
                    ("w4a16_linear", lambda: w4a16_linear(x, qweight, zeros, scales, None, 128)),
                    ("w4a16_gemm", lambda: w4a16_gemm(x, qweight, zeros, scales, None, 128))):
                ms = time_ms(fn)
                yield _row(name, shape + " g128", torch.bfloat16, ms, w4_bytes, bf16_ms,
                           speedup=bf16_ms / ms, rel_err=_rel_err(fn(), want),
                           tflops=flops / ms / 1e9, launch=cfg._asdict())
            del want
            if not fp8:
                continue
            exact = F.linear(x.float(), w).bfloat16()
            a_row, a_row_s = quantize_fp8(x)
            a_blk, a_blk_s = quantize_fp8(x, 128)

            def torch_quant_linear():
                a, a_s = kref.quantize_per_token(x)
                return fp8_scaled_mm(a, a_s, b_row.t(), row_scales, torch.bfloat16)
            fp8_bytes = m * k * 2 + k * n + m * n * 2
            variants = [
                ("fp8_linear", lambda: fp8_rowwise_linear(x, b_row, row_scales)),
                ("fp8_linear:torch_quant", torch_quant_linear),
                ("fp8_block_linear", lambda: fp8_block_gemm(
                    *quantize_fp8(x, 128), b_block, b_block_scales, (128, 128), torch.bfloat16)),
                ("fp8_scaled_mm", lambda: fp8_scaled_mm(a_row, a_row_s, b_row.t(), row_scales,
                                                        torch.bfloat16)),
                ("fp8_block_gemm", lambda: fp8_block_gemm(a_blk, a_blk_s, b_block,
                                                          b_block_scales, (128, 128),
                                                          torch.bfloat16))]
            if m <= 256:
                variants.append(("fp8_w8a16_gemm", lambda: fp8_w8a16_gemm(x, b_row, row_scales)))
            for name, fn in variants:
                ms = time_ms(fn)
                yield _row(name, shape, torch.bfloat16, ms, fp8_bytes, bf16_ms,
                           speedup=bf16_ms / ms, rel_err=_rel_err(fn(), exact),
                           tflops=flops / ms / 1e9)
            ms = time_ms(lambda: quantize_fp8(x))
            yield _row("fp8_quant", f"M{m} K{k} per token", torch.bfloat16, ms,
                       m * k * 3 + m * 4)


SWEEP_W4A16_SHAPES = [(4096, 6144, "8B qkv"), (14336, 4096, "8B down"),
                      (8192, 57344, "70B gate_up"), (28672, 8192, "70B down")]


def sweep_w4a16(dtypes):
    """W4A16 launch configs (tile, warps, split-K, how packed words are read) at decode M on
    8B/70B shapes, each checked against the torch reference first; config=None is
    config_for's pick. Short timings (rep 30 ms) so the sweep fits one 10-minute call."""
    from triton.testing import do_bench

    from hpcinfer.kernels import quant_reference as kref
    from hpcinfer.kernels.w4a16_gemm import W4A16Config, w4a16_gemm
    tiles = [(16, 64, 128, 4), (16, 128, 128, 4), (16, 32, 128, 4), (16, 64, 64, 4),
             (32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 8)]
    for k, n, model in SWEEP_W4A16_SHAPES:
        codes = torch.randint(0, 16, (k, n), device="cuda")
        zeros = torch.full((k // 128, n), 8, dtype=torch.int32, device="cuda")
        scales = torch.rand(k // 128, n, device="cuda") * 0.01
        qweight = kref.pack_k(codes)
        del codes
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            expected = kref.w4a16_gemm(x, qweight, zeros, scales, None, 128)
            num_bytes = (m * k + m * n) * 2 + k * n // 2 + 8 * (k // 128) * n
            variants = [None] + [W4A16Config(*t, split_k=sk, unpack_reshape=r)
                                 for t in tiles if min(m, 16) <= t[0] <= max(16, 2 * m)
                                 for sk in (1, 2, 4, 8) for r in (False, True)]
            for cfg in variants:
                def run(cfg=cfg):
                    return w4a16_gemm(x, qweight, zeros, scales, None, 128, config=cfg)
                try:
                    err = _rel_err(run(), expected)
                    ms = (do_bench(run, warmup=10, rep=30, return_mode="median")
                          if err < 2e-2 else float("nan"))
                except Exception as e:   # shared memory, registers: record, go on
                    log.warning("w4a16 %s failed: %s", cfg, str(e).splitlines()[0][:200])
                    err, ms = float("inf"), float("nan")
                yield _row("w4a16_gemm:sweep", f"M{m} K{k} N{n} ({model}) g128",
                           torch.bfloat16, ms, num_bytes,
                           config=None if cfg is None else cfg._asdict(), rel_err=err)


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    if torch.isnan(got).any():
        return float("inf")
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _sweep(kernel, shape, module, config_name, variants, run, expected, num_bytes, flops=None,
           captured=False):
    """Time each variant of module.<config_name>() on the same inputs, after checking it;
    ``captured``: as a CUDA-graph replay (the engine's decode steps), not eager launches."""
    default = getattr(module, config_name)
    try:
        for cfg in variants:
            setattr(module, config_name, lambda *a, cfg=cfg, **k: dict(cfg))
            try:
                err = _rel_err(run(), expected)
                timed = _captured(run) if captured else run
                ms = time_ms(timed) if err < 2e-2 else float("nan")
            except Exception as e:   # a config may not fit (shared memory): record, go on
                log.warning("%s %s failed: %s", kernel, cfg, str(e).splitlines()[0][:200])
                err, ms = float("inf"), float("nan")
            extra = {} if flops is None else dict(tflops=flops / ms / 1e9 if ms == ms else None)
            yield _row(f"{kernel}:sweep", shape, torch.bfloat16, ms, num_bytes, config=cfg,
                       rel_err=err, **extra)
    finally:
        setattr(module, config_name, default)


def sweep_decode(dtypes):
    from hpcinfer.kernels import decode_attention as mod
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.random_batch import make_paged_batch
    variants = [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n, w, s in
                [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 2, 3), (64, 8, 3), (128, 4, 3),
                 (128, 8, 3), (128, 4, 2)]]
    for num_seqs, ctx, head_dim in [(256, 512, 128), (256, 512, 64)]:
        b = make_paged_batch([ctx] * num_seqs, [1] * num_seqs, num_heads=32, num_kv_heads=8,
                             head_dim=head_dim, block_size=16, dtype=torch.bfloat16,
                             device="cuda", poison=False)
        out = torch.empty_like(b.q)
        expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                    b.seq_lens, 0.1)
        num_bytes = 2 * num_seqs * ctx * 8 * head_dim * 2 + 2 * b.q.nbytes

        def run():
            return mod.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                              b.seq_lens, 0.1, out=out)
        yield from _sweep("decode_attention", f"{num_seqs}x{ctx} ctx, h32/kv8, d{head_dim}",
                          mod, "decode_config", variants, run, expected, num_bytes)
    # Split-K partition size on a long-context, small batch.
    b = make_paged_batch([8192] * 8, [1] * 8, num_heads=32, num_kv_heads=8, head_dim=128,
                         block_size=16, dtype=torch.bfloat16, device="cuda", poison=False)
    expected = reference.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                                b.seq_lens, 0.1)
    for partition_size in (256, 512, 1024, 2048, 8192):
        def run(p=partition_size):
            return mod.paged_decode_attention(b.q, b.k_cache, b.v_cache, b.block_tables,
                                              b.seq_lens, 0.1, partition_size=p)
        ms = time_ms(run)
        yield _row("decode_attention:sweep", "8x8192 ctx, h32/kv8, d128", torch.bfloat16, ms,
                   2 * 8 * 8192 * 8 * 128 * 2, config=dict(partition_size=partition_size),
                   rel_err=_rel_err(run(), expected))


def sweep_prefill(dtypes):
    from hpcinfer.kernels import prefill_attention as mod
    from hpcinfer.kernels import reference
    from hpcinfer.kernels.random_batch import make_paged_batch
    variants = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                 (64, 32, 4, 3), (128, 128, 8, 2), (64, 64, 8, 3), (128, 64, 8, 4)]]
    # the same tiles with the query heads of a KV head packed into the rows (PACK_GQA)
    variants += [dict(v, PACK_GQA=True) for v in variants]
    wide = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
            [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)]]
    num_seqs, q_len, heads = 8, 512, 32
    for head_dim in (128, 64, 256):
        b = make_paged_batch([q_len] * num_seqs, [q_len] * num_seqs, num_heads=heads,
                             num_kv_heads=8, head_dim=head_dim, block_size=16,
                             dtype=torch.bfloat16, device="cuda", poison=False)
        out = torch.empty_like(b.q)
        expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q,
                                             b.seq_lens, b.block_tables, 0.1)

        def run():
            return mod.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                       b.block_tables, 0.1, out=out, max_seqlen_q=q_len)
        flops = 2 * 2 * num_seqs * heads * q_len * q_len * head_dim / 2
        yield from _sweep("prefill_attention", f"8x512 tok causal, h32/kv8, d{head_dim}", mod,
                          "prefill_config", wide if head_dim == 256 else variants, run,
                          expected, None, flops)
    # Workload P's mixed steps: ~100 rows of a 64-token question each, behind 1,024 cached
    # tokens (the H200 profile of 2026-12-04: ~1.6 ms a layer, ~75 TFLOP/s, in the default
    # 64 x 32 tiles that the causal 8 x 512 shape above chose).
    rows, q_len, context = 104, 64, 1024
    b = make_paged_batch([context + q_len] * rows, [q_len] * rows, num_heads=heads,
                         num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
                         device="cuda", poison=False)
    out = torch.empty_like(b.q)
    expected = reference.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                         b.block_tables, 0.1)

    def run_p():
        return mod.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens,
                                   b.block_tables, 0.1, out=out, max_seqlen_q=q_len)
    flops = 2 * 2 * rows * heads * q_len * (context + (q_len + 1) / 2) * 128
    yield from _sweep("prefill_attention", f"P mixed: {rows}x{q_len} tok over {context} cached, "
                      "h32/kv8, d128", mod, "prefill_config", variants, run_p, expected, None,
                      flops)


if __name__ == "__main__":
    main()
