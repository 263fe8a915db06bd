"""Fused mixture-of-experts: two grouped GEMMs over token-expert pairs sorted by expert.

Reference: :func:`hpcinfer.kernels.moe_reference.fused_experts` (same arguments, same
contract). The design is the known one (vLLM's and SGLang's fused_moe):

1. ``align_pairs_to_blocks`` sorts the ``num_tokens * top_k`` (token, expert) pairs by expert
   and pads each expert's run to a multiple of ``BLOCK_M``, so every block of ``BLOCK_M``
   sorted rows belongs to one expert: three small Triton launches at decode sizes (torch ops
   for prefill), no host sync, shapes that depend only on the batch's *shape*, so it is
   captured in CUDA graphs.
2. ``_moe_gate_up_kernel``: per block, rows of x (gathered by pair) times that expert's gate
   and up rows, the activation applied in registers; writes ``act(gate) * up`` per pair.
3. ``_moe_down_kernel``: those rows times the expert's down projection, times the routing
   weight; writes one row per pair in the activations' dtype (rounded there, as the
   reference's per-expert loop rounds each expert's output).
4. ``_moe_sum_kernel``: a token's top-k rows summed in fp32, skipping pairs whose expert id is
   not this rank's (never written), so no buffer has to be zeroed first.

Each weight tile is read once per block of ``BLOCK_M`` pairs of one expert, which is what
makes this many times faster than a per-expert loop at decode sizes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KernelArgumentError, check_contiguous,
                            check_dim, check_dtype, check_same_device, interpreted)
from .moe_reference import ACTIVATIONS

_ACT_CODES = {"silu": 0, "swiglu_oai": 1}


def align_pairs_to_blocks(topk_ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to ``block_m`` rows.

    Returns ``sorted_pairs`` [max_rows] int32 (pair index ``token * top_k + j``; padding rows
    hold ``num_pairs``), ``block_expert`` [max_rows // block_m] int32 (the expert of each
    block; -1 past the used blocks) and ``num_rows`` [1] int32 (rows in use). Pairs whose id
    is outside ``[0, num_experts)`` are left out (another rank's experts). Within an expert
    the pairs keep their order.

    Up to ALIGN_MAX_PAIRS pairs (decode steps) three Triton launches do it: per chunk of
    ALIGN_CHUNK pairs the experts' counts; one program turning them into each chunk's write
    offset per expert, the block experts and the padding; per chunk the scatter (a pair's
    place is its chunk's offset for its expert plus the same-expert pairs before it in the
    chunk). Why: the torch form is ~35 small launches, ~80 us of a CUDA-graph replay whatever
    the batch (the whole layer took 0.117 ms at one token on an H200), a fixed cost in every
    MoE layer of every decode step. Larger batches (prefill) keep the torch form, where the
    GEMMs dwarf it.
    """
    num_pairs = topk_ids.numel()
    if (num_pairs > ALIGN_MAX_PAIRS or num_experts > ALIGN_MAX_EXPERTS
            or not (topk_ids.is_cuda or interpreted())):
        return align_pairs_to_blocks_torch(topk_ids, num_experts, block_m)
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    max_rows = _max_rows(num_pairs, num_experts, block_m)
    num_chunks = triton.cdiv(num_pairs, ALIGN_CHUNK)
    experts_p = max(16, triton.next_power_of_2(num_experts))
    counts = torch.empty(num_chunks, experts_p, dtype=torch.int32, device=device)
    offsets = torch.empty_like(counts)
    sorted_pairs = torch.empty(max_rows, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
    num_rows = torch.empty(1, dtype=torch.int32, device=device)
    _moe_count_kernel[(num_chunks,)](flat, counts, num_pairs, CHUNK=ALIGN_CHUNK,
                                     E_P=experts_p, num_warps=4)
    _moe_offsets_kernel[(1,)](counts, offsets, sorted_pairs, block_expert, num_rows,
                              num_chunks, num_experts, num_pairs, max_rows, BLOCK_M=block_m,
                              NC_P=max(16, triton.next_power_of_2(num_chunks)), E_P=experts_p,
                              BLOCKS_CHUNK=64, FILL=1024, num_warps=8)
    _moe_scatter_kernel[(num_chunks,)](flat, offsets, sorted_pairs, num_pairs, num_experts,
                                       CHUNK=ALIGN_CHUNK, E_P=experts_p, num_warps=4)
    return sorted_pairs, block_expert, num_rows


# The Triton alignment's limits: one program holds [chunks, experts] counts (128 x 256).
ALIGN_CHUNK = 128
ALIGN_MAX_PAIRS = 128 * ALIGN_CHUNK
ALIGN_MAX_EXPERTS = 256


def _max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    # At most min(E, num_pairs) experts are non-empty, each padded by < block_m rows.
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


@triton.jit
def _moe_count_kernel(IDS, COUNTS, num_pairs, CHUNK: tl.constexpr, E_P: tl.constexpr):
    # counts[c, e]: pairs of chunk c routed to expert e (ids past E_P or negative: nowhere)
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(IDS + offs, mask=offs < num_pairs, other=-1)
    experts = tl.arange(0, E_P)
    hit = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(COUNTS + chunk * E_P + experts, tl.sum(hit, axis=0))


@triton.jit
def _moe_offsets_kernel(COUNTS, OFFSETS, SORTED, BLOCK_EXPERT, NUM_ROWS, num_chunks,
                        num_experts, num_pairs, max_rows, BLOCK_M: tl.constexpr,
                        NC_P: tl.constexpr, E_P: tl.constexpr, BLOCKS_CHUNK: tl.constexpr,
                        FILL: tl.constexpr):
    # One program: expert e's run starts at the padded sizes of experts < e; chunk c writes
    # its pairs of e after those of chunks < c. Then the block -> expert map and the padding.
    chunks = tl.arange(0, NC_P)
    experts = tl.arange(0, E_P)
    is_expert = experts < num_experts
    mask = (chunks[:, None] < num_chunks) & is_expert[None, :]
    counts = tl.load(COUNTS + chunks[:, None] * E_P + experts[None, :], mask=mask, other=0)
    total = tl.sum(counts, axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    before = tl.cumsum(counts, axis=0) - counts
    tl.store(OFFSETS + chunks[:, None] * E_P + experts[None, :],
             (padded_end - padded)[None, :] + before, mask=mask)
    tl.store(NUM_ROWS, tl.sum(padded, axis=0))
    num_blocks = max_rows // BLOCK_M
    for b0 in range(0, num_blocks, BLOCKS_CHUNK):
        blocks = b0 + tl.arange(0, BLOCKS_CHUNK)
        # the block's expert: how many experts' runs end at or before its first row
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & is_expert[None, :]
        expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(BLOCK_EXPERT + blocks, tl.where(expert < num_experts, expert, -1),
                 mask=blocks < num_blocks)
    # every row starts as padding; the scatter launch then writes the real pairs
    for r0 in range(0, max_rows, FILL):
        rows = r0 + tl.arange(0, FILL)
        tl.store(SORTED + rows, tl.zeros((FILL,), dtype=tl.int32) + num_pairs,
                 mask=rows < max_rows)


@triton.jit
def _moe_scatter_kernel(IDS, OFFSETS, SORTED, num_pairs, num_experts, CHUNK: tl.constexpr,
                        E_P: tl.constexpr):
    chunk = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + local
    ids = tl.load(IDS + offs, mask=offs < num_pairs, other=-1)
    valid = (offs < num_pairs) & (ids >= 0) & (ids < num_experts)
    # pairs of the same expert earlier in this chunk (keeps the pairs' order within experts)
    earlier = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    start = tl.load(OFFSETS + chunk * E_P + ids, mask=valid, other=0)
    tl.store(SORTED + start + rank, offs.to(tl.int32), mask=valid)


def align_pairs_to_blocks_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align_pairs_to_blocks in ~35 torch ops: prefill sizes, and the oracle of the kernels.

    Returns ``sorted_pairs`` [max_rows] int32 (pair index ``token * top_k + j``; padding rows
    hold ``num_pairs``), ``block_expert`` [max_rows // block_m] int32 (the expert of each
    block; -1 past the used blocks) and ``num_rows`` [1] int32 (rows in use). Pairs whose id
    is outside ``[0, num_experts)`` are left out (another rank's experts).
    """
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, num_experts)          # the left-out pairs: bucket E
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    max_rows = _max_rows(num_pairs, num_experts, block_m)
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    first_of_bucket = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_pairs, device=device) - first_of_bucket[sorted_bucket]
    start = torch.cat([padded_end - padded, padded_end.new_full((1,), max_rows)])
    dest = torch.where(sorted_bucket < num_experts, start[sorted_bucket] + rank_in_expert,
                       max_rows)                            # left out: the extra trash row
    sorted_pairs = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, max_rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs[:max_rows], block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _moe_gate_up_kernel(
    X, W, BIAS, OUT, SORTED_PAIRS, BLOCK_EXPERT, NUM_ROWS,
    num_pairs, top_k, inter, hidden, alpha, limit,
    stride_xm, stride_we, stride_wn, stride_be, stride_om,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # Blocks past the used rows (the grid is sized for the worst case) do nothing.
    if pid_m * BLOCK_M >= tl.load(NUM_ROWS):
        return
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SORTED_PAIRS + rows).to(tl.int64)
    row_mask = pair < num_pairs
    token = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    w_gate = W + expert * stride_we + offs_n[None, :] * stride_wn
    w_up = w_gate + inter * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        a = tl.load(X + token[:, None] * stride_xm + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(w_gate + offs_k[:, None], mask=w_mask, other=0.0)   # [BLOCK_K, BLOCK_N]
        wu = tl.load(w_up + offs_k[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, wg, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
    if HAS_BIAS:
        b = BIAS + expert * stride_be + offs_n
        acc_gate += tl.load(b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(b + inter, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:    # SwiGLU, rounding where unfused torch rounds (after each matmul and silu)
        gate = acc_gate.to(OUT.dtype.element_ty).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(OUT.dtype.element_ty).to(tl.float32)
        h = act * acc_up.to(OUT.dtype.element_ty).to(tl.float32)
    else:           # gpt-oss: clamped SwiGLU with a sigmoid gain, (up + 1)
        gate = tl.minimum(acc_gate, limit)
        up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        h = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    tl.store(OUT + pair[:, None] * stride_om + offs_n[None, :], h.to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    H, W, BIAS, WEIGHTS, OUT, SORTED_PAIRS, BLOCK_EXPERT, NUM_ROWS,
    num_pairs, hidden, inter,
    stride_hm, stride_we, stride_wn, stride_be, stride_om,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_ROWS):
        return
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(SORTED_PAIRS + rows).to(tl.int64)
    row_mask = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    w = W + expert * stride_we + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < inter
        a = tl.load(H + pair[:, None] * stride_hm + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + expert * stride_be + offs_n, mask=n_mask,
                       other=0.0).to(tl.float32)[None, :]
    routing = tl.load(WEIGHTS + pair, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(OUT + pair[:, None] * stride_om + offs_n[None, :],
             (acc * routing[:, None]).to(OUT.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_kernel(P, IDS, OUT, hidden, num_experts, stride_pm, stride_om,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program per (token, BLOCK_H columns): sum of the token's pair rows in fp32, in
    # order j = 0 .. top_k - 1; a pair of another rank's expert (id outside [0, E)) adds 0
    token, col = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = col * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(IDS + token * TOP_K + j) + tl.zeros((BLOCK_H,), dtype=tl.int32)
        local = mask & (expert >= 0) & (expert < num_experts)
        row = tl.load(P + (token * TOP_K + j) * stride_pm + offs, mask=local, other=0.0)
        acc += row.to(tl.float32)
    tl.store(OUT + token * stride_om + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def _moe_config(num_pairs: int, num_experts: int, element_size: int = 2) -> dict:
    """Tile sizes and launch settings (bench/kernel_bench.py --sweep replaces this to try others).

    The keys apply to both GEMMs; an optional ``DOWN`` dict overrides BLOCK_N, BLOCK_K,
    num_warps and num_stages for the down projection (its K is the small intermediate size,
    its N the hidden size: the gate/up GEMM's shape transposed). BLOCK_M is shared, as both
    walk the same expert-aligned blocks. Rows per expert decide BLOCK_M: decode batches give
    each expert a handful of pairs, and a 64-row block would be mostly padding. The
    interpreter wants small tiles (it is slow)."""
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert >= 256:
        # Prefill-sized: on an H200, 8192 tokens of the Qwen3-30B-A3B layer took 2.12 ms with
        # these tiles vs 2.55 ms with 64x64 (bench/results/kernels-moe-nvidia-h200-2026-12-03).
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    # Decode-sized, from the CUDA-graph sweep on an H200 (bench/results/
    # kernels-moe-sweep-graphs-nvidia-h200-2026-12-05.json): up to 16 rows an expert, 16-row
    # blocks with 128-deep K tiles (64 tokens 0.395 ms vs 0.411 with 64-deep); above that,
    # 64-row blocks (1024 tokens 0.598 ms vs 0.687 with the 32-row blocks used before).
    # fp32 keeps 64-deep K: its gate and up tiles at 128 would take ~216 KiB of shared memory
    # over 3 stages, at the H200's limit (232 KiB a block).
    if rows_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128 if element_size <= 2 else 64,
                    num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


def _check(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down, activation):
    check_dim("x", x, 2, "[num_tokens, hidden]")
    check_dim("w_gate_up", w_gate_up, 3, "[num_experts, 2 * inter, hidden]")
    check_dim("w_down", w_down, 3, "[num_experts, hidden, inter]")
    num_experts, hidden, inter = w_down.shape
    if tuple(w_gate_up.shape) != (num_experts, 2 * inter, hidden) or x.shape[1] != hidden:
        raise KernelArgumentError(
            f"shapes disagree: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, w_down "
            f"{tuple(w_down.shape)}; need x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or \
            tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise KernelArgumentError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                                  f"{tuple(topk_weights.shape)} must both be [num_tokens, top_k] "
                                  f"with num_tokens = {x.shape[0]}")
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_dtype(name, t, FLOAT_DTYPES)
        check_contiguous(name, t)
    if not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise KernelArgumentError(f"x, w_gate_up and w_down must share a dtype, got {x.dtype}, "
                                  f"{w_gate_up.dtype}, {w_down.dtype}")
    check_dtype("topk_ids", topk_ids, INDEX_DTYPES)
    check_dtype("topk_weights", topk_weights, (torch.float32,))
    check_contiguous("topk_weights", topk_weights)
    for name, bias, rows in (("b_gate_up", b_gate_up, 2 * inter), ("b_down", b_down, hidden)):
        if bias is not None and (tuple(bias.shape) != (num_experts, rows)
                                 or not bias.is_contiguous()):
            raise KernelArgumentError(f"{name} must be a contiguous [{num_experts}, {rows}], got "
                                      f"{tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise KernelArgumentError(f"unknown activation {activation!r}; choose one of "
                                  f"{list(ACTIVATIONS)}")
    check_same_device(x=x, w_gate_up=w_gate_up, w_down=w_down, topk_ids=topk_ids,
                      topk_weights=topk_weights)


def split_config(config: dict) -> tuple[dict, dict]:
    """(gate/up launch, down launch) of a _moe_config() dict: ``DOWN`` overrides the second."""
    gate_up = dict(config)
    overrides = gate_up.pop("DOWN", {})
    down = {**gate_up, **overrides}
    if down["BLOCK_M"] != gate_up["BLOCK_M"]:
        raise KernelArgumentError("the down projection's BLOCK_M must be the gate/up one's "
                                  "(both walk the same expert-aligned blocks)")
    return gate_up, down


def fused_experts(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  activation: str = "silu", b_gate_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None, alpha: float = 1.702,
                  limit: float = 7.0) -> torch.Tensor:
    """See ``moe_reference.fused_experts``: [num_tokens, hidden] in x's dtype."""
    _check(x, w_gate_up, w_down, topk_weights, topk_ids, b_gate_up, b_down, activation)
    num_tokens, top_k = topk_ids.shape
    num_experts = w_down.shape[0]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    gate_up_config, down_config = split_config(
        _moe_config(num_pairs, num_experts, x.element_size()))
    blocks = align_pairs_to_blocks(topk_ids, num_experts, gate_up_config["BLOCK_M"])
    h = gate_up_pairs(x, w_gate_up, b_gate_up, blocks, top_k, activation, alpha, limit,
                      gate_up_config)
    partial = down_pairs(h, w_down, b_down, topk_weights, blocks, down_config)
    return sum_pairs(partial, topk_ids, num_experts)


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get full-precision dots (the default would be TF32 on the GPU).
    return "ieee" if dtype == torch.float32 else "tf32"


def gate_up_pairs(x, w_gate_up, b_gate_up, blocks, top_k: int, activation: str, alpha: float,
                  limit: float, config: dict) -> torch.Tensor:
    """act(gate) * up for every pair: [num_pairs, inter] in x's dtype (one launch)."""
    sorted_pairs, block_expert, num_rows = blocks
    num_pairs, inter = x.shape[0] * top_k, w_gate_up.shape[1] // 2
    hidden = x.shape[1]
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(block_expert.shape[0], triton.cdiv(inter, config["BLOCK_N"]))](
        x, w_gate_up, b_gate_up if b_gate_up is not None else w_gate_up, h, sorted_pairs,
        block_expert, num_rows, num_pairs, top_k, inter, hidden, float(alpha), float(limit),
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1),
        b_gate_up.stride(0) if b_gate_up is not None else 0, h.stride(0),
        HAS_BIAS=b_gate_up is not None, ACT=_ACT_CODES[activation],
        PRECISION=_precision(x.dtype), **config)
    return h


def down_pairs(h, w_down, b_down, topk_weights, blocks, config: dict) -> torch.Tensor:
    """Each pair's down projection times its routing weight: [num_pairs, hidden] in h's
    dtype (one launch). Rows of pairs whose expert is not this rank's are left unwritten."""
    sorted_pairs, block_expert, num_rows = blocks
    num_pairs, inter = h.shape
    hidden = w_down.shape[1]
    out = torch.empty(num_pairs, hidden, dtype=h.dtype, device=h.device)
    _moe_down_kernel[(block_expert.shape[0], triton.cdiv(hidden, config["BLOCK_N"]))](
        h, w_down, b_down if b_down is not None else w_down, topk_weights, out, sorted_pairs,
        block_expert, num_rows, num_pairs, hidden, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1),
        b_down.stride(0) if b_down is not None else 0, out.stride(0),
        HAS_BIAS=b_down is not None, PRECISION=_precision(h.dtype), **config)
    return out


def sum_pairs(partial: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
              ) -> torch.Tensor:
    """[num_tokens * top_k, hidden] pair rows -> [num_tokens, hidden], summed in fp32 over
    the pairs whose expert id is in [0, num_experts) (one launch)."""
    num_tokens, top_k = topk_ids.shape
    hidden = partial.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=partial.dtype, device=partial.device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        partial, topk_ids.contiguous(), out, hidden, num_experts, partial.stride(0),
        out.stride(0), TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out
