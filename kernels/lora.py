"""Batched LoRA over rows that carry different adapters: grouped shrink/expand in Triton.

Each token row t has a slot index ``slots[t]`` into the stacked adapter weights of one
linear layer (-1: the base model only). ``lora_shrink`` computes ``x[t] @ A[slot]^T`` and
``lora_expand`` adds ``shrunk[t] @ B[slot]^T`` into the layer's output.

Layout of the work (the SGMV idea without a sort): a program owns a tile of BLOCK_M rows.
For every slot present among its rows it loads that adapter's A (or B) tile once and runs
one tensor-core ``tl.dot`` over the whole row tile, with the rows of other slots zeroed, so
an adapter's weights are read once per row tile instead of once per row; slots absent from
the tile cost one compare. Rows without an adapter are never stored to by the expand. No
sorting, no host-side index building: the kernels read only ``slots`` (a static buffer in
decode CUDA graphs), so the same launch serves any mix of adapters.

- shrink, split-K: grid (row tiles, K splits); each program writes its fp32 partial sum of
  ``x @ A^T`` over its K range to ``partials[split]`` (every row, zeros for null rows), so a
  decode batch of a few row tiles still spreads over many SMs; no atomics, deterministic.
- expand, fused over the pieces of a merged layer: ``lora_b`` is [S, N, R] over the whole
  output ([q | k | v] or [gate | up]); piece p (columns [bounds[p], bounds[p+1])) takes
  shrunk columns [p*R, (p+1)*R). It sums the shrink's partials as it loads them. One shrink
  and one expand launch per layer, whatever the number of pieces.

The torch reference is hpcinfer.kernels.lora_reference (same functions and arguments).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hpcinfer.kernels.launch_checks import (FLOAT_DTYPES, INDEX_DTYPES, KernelArgumentError,
                                            check_dim, check_dtype, check_last_dim_contiguous,
                                            check_same_device, interpreted)

MAX_LORA_RANK = 256     # ranks up to this (times the pieces) fit one register tile
MAX_PIECES = 3          # q/k/v
MAX_SPLIT_K = 16
TARGET_PROGRAMS = 128   # about one wave of an H100/H200 for the shrink
# Triton 3.9's interpreter computes tl.dot of bf16 tiles wrongly (garbage, ~1e10): under
# TRITON_INTERPRET the dots take fp32 copies of the (bf16-valued) tiles, the same products.


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, part_ptr, T, K, PR, K_PER_SPLIT,
                        stride_xt, stride_as, stride_ar, stride_ps, stride_pt,
                        NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_PR: tl.constexpr, PRECISION: tl.constexpr,
                        DOT_F32: tl.constexpr):
    pid_m, split = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    row_slot = tl.load(slots_ptr + offs_m, mask=row_ok, other=-1).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_PR)
    r_ok = offs_r < PR
    acc = tl.zeros((BLOCK_M, BLOCK_PR), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    if tl.max(row_slot, axis=0) >= 0:   # a tile of base rows only loads nothing
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_end
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xt + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            # Unrolled over the slots so their loads issue together; a slot with no row in
            # this tile has its load masked off (no memory traffic) and adds a dot of zeros.
            for s in tl.static_range(NUM_SLOTS):
                in_s = row_slot == s
                present = tl.max(in_s.to(tl.int32), axis=0)   # 1 if slot s has rows here
                # A[s] tile as [BLOCK_K, BLOCK_PR] (A is [S, PR, K], K contiguous)
                a = tl.load(a_ptr + s * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None],
                            mask=(offs_r < PR * present)[None, :] & k_ok[:, None], other=0.0)
                xs = tl.where(in_s[:, None], x, tl.zeros_like(x)).to(a.dtype)
                if DOT_F32:
                    acc = tl.dot(xs.to(tl.float32), a.to(tl.float32), acc)
                else:
                    acc = tl.dot(xs, a, acc, input_precision=PRECISION)
    tl.store(part_ptr + split * stride_ps + offs_m[:, None] * stride_pt + offs_r[None, :],
             acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(t_ptr, b_ptr, slots_ptr, y_ptr, out_ptr, T, N, R, BOUND1, BOUND2,
                        stride_ts, stride_tt, stride_tslot, stride_bs, stride_bn, stride_yt,
                        stride_ot,
                        NUM_SLOTS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        NUM_PIECES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                        T_BY_SLOT: tl.constexpr, SEPARATE_OUT: tl.constexpr):
    # T_BY_SLOT: t holds every slot's shrink side by side (slot s's at columns s *
    # stride_tslot), as the base GEMM over the stacked weight makes it; each row reads its
    # own slot's block. SEPARATE_OUT: out = y + delta for every row (y is the strided base
    # output, out a fresh contiguous tensor), instead of y += delta for adapter rows only.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < T
    row_slot = tl.load(slots_ptr + offs_m, mask=row_ok, other=-1).to(tl.int32)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    any_adapter = tl.max(row_slot, axis=0) >= 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if any_adapter:   # a tile of base rows computes nothing
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        for p in tl.static_range(NUM_PIECES):
            # piece p: output columns [lo, hi), shrunk columns [p*R, p*R + R)
            if p == 0:
                lo = 0
            elif p == 1:
                lo = BOUND1
            else:
                lo = BOUND2
            if p == NUM_PIECES - 1:
                hi = N
            elif p == 0:
                hi = BOUND1
            else:
                hi = BOUND2
            if (n0 < hi) & (n0 + BLOCK_N > lo):   # this column tile overlaps piece p
                if not T_BY_SLOT:
                    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for sp in tl.static_range(NUM_SPLITS):   # sum the shrink's partials
                        t += tl.load(t_ptr + sp * stride_ts + offs_m[:, None] * stride_tt
                                     + (p * R + offs_r)[None, :],
                                     mask=row_ok[:, None] & r_ok[None, :],
                                     other=0.0).to(tl.float32)
                    t = t.to(b_ptr.dtype.element_ty)
                in_piece = n_ok & (offs_n >= lo) & (offs_n < hi)
                for s in tl.static_range(NUM_SLOTS):   # as in the shrink
                    in_s = row_slot == s
                    present = tl.max(in_s.to(tl.int32), axis=0)   # 1 if slot s has rows here
                    # B[s] tile as [BLOCK_R, BLOCK_N] (B is [S, N, R], R contiguous)
                    b = tl.load(b_ptr + s * stride_bs + offs_n[None, :] * stride_bn
                                + offs_r[:, None],
                                mask=(offs_r < R * present)[:, None] & in_piece[None, :],
                                other=0.0)
                    if T_BY_SLOT:   # only slot s's rows load, from slot s's block
                        ts = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tt
                                     + (s * stride_tslot + p * R + offs_r)[None, :],
                                     mask=(row_ok & in_s)[:, None] & r_ok[None, :],
                                     other=0.0).to(b_ptr.dtype.element_ty)
                    else:
                        ts = tl.where(in_s[:, None], t, tl.zeros_like(t))
                    if DOT_F32:
                        acc = tl.dot(ts.to(tl.float32), b.to(tl.float32), acc)
                    else:
                        acc = tl.dot(ts, b, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    if SEPARATE_OUT:   # every row: base rows are copied
        o_mask = row_ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_ot + offs_n[None, :],
                 (y + acc).to(out_ptr.dtype.element_ty), mask=o_mask)
    elif any_adapter:   # in place: rows without an adapter are left as they are
        y_mask = (row_ok & (row_slot >= 0))[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


# Rows up to this many count as a decode-sized call: the launches below were picked for them
# by the lora_tiles sweep on an H200 (2026-12-03, bench/results/
# kernels-lora-sweep-nvidia-h200-2026-12-03.json: 15 shrink and 14 expand variants at 64 and
# 256 rows over the 1B layers; summed over the shapes the fastest, within 1 us of each
# shape's best, and 5% less time than the first guesses over the 16 shape x size pairs).
# Prefill-sized calls keep the first guesses.
DECODE_ROWS = 512


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 16 else 32 if num_tokens <= 32 else 64


def shrink_split(num_tokens: int, k: int) -> int:
    """K splits the shrink makes for ``num_tokens`` rows: the first dimension of its partials
    (one rule for _shrink_config and the callers that size or check the partials)."""
    if num_tokens <= DECODE_ROWS:
        return max(1, min(8, k // 256))   # decode-sized: 8 splits, each >= 256 of K
    return _wave_split(num_tokens, k)


def _wave_split(num_tokens: int, k: int) -> int:
    """Prefill-sized calls: enough programs for about one wave while each keeps >= 256 of K
    (the expand sums the partials, so no more than needed)."""
    tiles, split = triton.cdiv(num_tokens, _block_m(num_tokens)), 1
    while tiles * split < TARGET_PROGRAMS and k // (2 * split) >= 256 and split < MAX_SPLIT_K:
        split *= 2
    return split


def _shrink_config(num_tokens: int, k: int, num_slots: int, block_pr: int,
                   elem_size: int = 2) -> dict:
    """Shrink launch (bench/kernel_bench.py --only lora_tiles times alternatives by replacing
    this function)."""
    # the unrolled slots' A tiles (num_slots x BLOCK_K x BLOCK_PR) within 64 KiB (4 x 128 x
    # 64 in bf16); Triton keeps ~3 stages of them in shared memory, so fp32 tiles of the bf16
    # size asked for 280-360 KiB on the H200 (232 KiB there: OutOfResources, 2026-12-03)
    block_k = max(16, min(128, _pow2_floor(65536 // (num_slots * block_pr * elem_size))))
    # decode-sized: small row tiles and 8 K splits (shrink_split), many programs for few rows
    block_m = 16 if num_tokens <= DECODE_ROWS else _block_m(num_tokens)
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, SPLIT=shrink_split(num_tokens, k),
                num_warps=4)


def _expand_config(num_tokens: int, n: int) -> dict:
    """Expand launch (as _shrink_config)."""
    if num_tokens <= 64:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4)
    if num_tokens <= DECODE_ROWS:
        return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return dict(BLOCK_M=_block_m(num_tokens), BLOCK_N=128, num_warps=4)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get full-precision dots (the default would be TF32 on the GPU)
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_slots(slots: torch.Tensor, num_rows: int) -> None:
    check_dim("slots", slots, 1, "[num_tokens]")
    check_dtype("slots", slots, INDEX_DTYPES)
    if slots.shape[0] != num_rows:
        raise KernelArgumentError(f"slots has {slots.shape[0]} rows, the input {num_rows}: "
                                  "pass one slot index per token row")


def lora_shrink_partials(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor
                         ) -> torch.Tensor:
    """x: [T, K], lora_a: [S, PR, K], slots: [T] (-1: none) -> fp32 [splits, T, PR] whose
    sum over dim 0 is each row's ``x @ A[slot]^T`` (0 for rows without an adapter).
    ``lora_expand`` takes it as it is (and sums it)."""
    check_dim("x", x, 2, "[num_tokens, in_features]")
    check_dim("lora_a", lora_a, 3, "[num_slots, rank, in_features]")
    for name, t in (("x", x), ("lora_a", lora_a)):
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_dim_contiguous(name, t)
    check_same_device(x=x, lora_a=lora_a, slots=slots)
    num_tokens, k = x.shape
    if lora_a.shape[2] != k:
        raise KernelArgumentError(f"lora_a has {lora_a.shape[2]} input features, x {k}")
    rank = lora_a.shape[1]
    if not 0 < rank <= MAX_PIECES * MAX_LORA_RANK:
        raise KernelArgumentError(f"LoRA rank {rank} is not supported by the kernels "
                                  f"(1..{MAX_LORA_RANK} per piece); lower max_lora_rank")
    _check_slots(slots, num_tokens)
    num_slots, block_pr = lora_a.shape[0], max(16, triton.next_power_of_2(rank))
    cfg = _shrink_config(num_tokens, k, num_slots, block_pr, lora_a.element_size())
    split = cfg.pop("SPLIT")
    out = torch.empty((split, num_tokens, rank), dtype=torch.float32, device=x.device)
    if num_tokens:
        k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        _lora_shrink_kernel[(triton.cdiv(num_tokens, cfg["BLOCK_M"]), split)](
            x, lora_a, slots, out, num_tokens, k, rank, k_per_split,
            x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0), out.stride(1),
            NUM_SLOTS=num_slots, BLOCK_PR=block_pr, PRECISION=_precision(lora_a.dtype),
            DOT_F32=interpreted(), **cfg)
    return out


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: [T, K], lora_a: [S, R, K], slots: [T] (-1: none) -> [T, R] in x's dtype (the
    partials summed; the layers pass the partials straight to ``lora_expand``)."""
    return lora_shrink_partials(x, lora_a, slots).sum(0).to(x.dtype)


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
                bounds: tuple[int, ...] | None = None) -> None:
    """y[T, N] += t[T, P*R] @ lora_b[slot]^T per row and piece, in place.

    lora_b: [S, N, R]; ``bounds`` (0 = b0 < b1 < ... < bP = N) cuts the output into P <= 3
    pieces, piece p taking columns [p*R, (p+1)*R) of t (None: one piece). t: [T, P*R], or
    the shrink's partials [splits, T, P*R]. ``y`` may be a column slice of a wider output.
    Rows with slot < 0 are not touched."""
    parts = t if t.dim() == 3 else t.unsqueeze(0)
    check_dim("t", parts, 3, "[num_tokens, pieces * rank] or [splits, num_tokens, ...]")
    bounds = _check_expand(y, parts.shape[1:], lora_b, slots, bounds, t, parts)
    _launch_expand(y, parts, lora_b, slots, bounds, y, t_by_slot=False)


def lora_expand_stacked(base: torch.Tensor, t_all: torch.Tensor, lora_b: torch.Tensor,
                        slots: torch.Tensor, bounds: tuple[int, ...] | None = None
                        ) -> torch.Tensor:
    """A new [T, N] tensor: ``base`` plus, per row with a slot, its block of ``t_all`` times
    its adapter's B (rows without one: ``base`` as it is).

    ``t_all``: [T, S*P*R], every slot's shrink side by side (slot s at columns [s*P*R,
    (s+1)*P*R), its pieces as in ``lora_expand``), as one GEMM over a weight with the
    slots' A stacked under the base weight makes it (hpcinfer/lora/layers.py); ``base`` and
    ``t_all`` may be column slices of that GEMM's output. lora_b: [S, N, R]; ``bounds`` as in
    ``lora_expand``."""
    check_dim("t_all", t_all, 2, "[num_tokens, slots * pieces * rank]")
    num_slots, rank = lora_b.shape[0], lora_b.shape[2]
    pieces = 1 if bounds is None else len(bounds) - 1
    if t_all.shape[1] != num_slots * pieces * rank:
        raise KernelArgumentError(f"t_all has {t_all.shape[1]} columns, want slots x pieces x "
                                  f"rank = {num_slots} x {pieces} x {rank}")
    bounds = _check_expand(base, (t_all.shape[0], pieces * rank), lora_b, slots, bounds,
                           t_all, t_all.unsqueeze(0))
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    _launch_expand(base, t_all.unsqueeze(0), lora_b, slots, bounds, out, t_by_slot=True)
    return out


def _check_expand(y, t_shape, lora_b, slots, bounds, t, parts) -> tuple[int, ...]:
    """The argument checks both expands share (``t_shape``: the [T, P*R] that ``t`` stands
    for; ``parts``: t as [splits, T, ...]). Returns the bounds, (0, N) for None."""
    check_dim("y", y, 2, "[num_tokens, out_features]")
    check_dim("lora_b", lora_b, 3, "[num_slots, out_features, rank]")
    for name, tensor in (("y", y), ("t", parts), ("lora_b", lora_b)):
        check_dtype(name, tensor, FLOAT_DTYPES)
        check_last_dim_contiguous(name, tensor)
    check_same_device(y=y, t=parts, lora_b=lora_b, slots=slots)
    num_tokens, n = y.shape
    rank = lora_b.shape[2]
    bounds = tuple(bounds) if bounds is not None else (0, n)
    pieces = len(bounds) - 1
    if (lora_b.shape[1] != n or tuple(t_shape) != (num_tokens, pieces * rank)
            or not 1 <= pieces <= MAX_PIECES or bounds[0] != 0 or bounds[-1] != n
            or any(lo >= hi for lo, hi in zip(bounds, bounds[1:]))):
        raise KernelArgumentError(f"shapes disagree: y {tuple(y.shape)}, t {tuple(t.shape)}, "
                                  f"lora_b {tuple(lora_b.shape)}, bounds {bounds} (want [T, N], "
                                  "[T, P*R], [S, N, R], 0 = b0 < ... < bP = N, P <= 3)")
    if not 0 < rank <= MAX_LORA_RANK:
        raise KernelArgumentError(f"LoRA rank {rank} is not supported by the kernels "
                                  f"(1..{MAX_LORA_RANK}); lower max_lora_rank")
    _check_slots(slots, num_tokens)
    return bounds


def _launch_expand(y, parts, lora_b, slots, bounds, out, t_by_slot: bool) -> None:
    num_tokens, n = y.shape
    if not num_tokens:
        return
    rank, pieces = lora_b.shape[2], len(bounds) - 1
    cfg = _expand_config(num_tokens, n)
    inner = list(bounds[1:-1]) + [n] * (2 - (pieces - 1))
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _lora_expand_kernel[grid](
        parts, lora_b, slots, y, out, num_tokens, n, rank, inner[0], inner[1],
        parts.stride(0), parts.stride(1), pieces * rank, lora_b.stride(0), lora_b.stride(1),
        y.stride(0), out.stride(0),
        NUM_SLOTS=lora_b.shape[0], NUM_SPLITS=parts.shape[0], NUM_PIECES=pieces,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), PRECISION=_precision(lora_b.dtype),
        DOT_F32=interpreted(), T_BY_SLOT=t_by_slot, SEPARATE_OUT=out is not y, **cfg)
