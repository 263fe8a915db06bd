"""Torch reference of the batched LoRA "shrink" and "expand" (hpcinfer.kernels.lora).

Every token row carries the slot of its adapter in the slot pool (-1: no adapter). Shrink
projects each row onto its adapter's A, expand adds that times its adapter's B to the
output, piece by piece for a merged layer. Runs on any device; the CPU engine uses it and the
Triton kernels are tested against it. Scaling (lora_alpha / r) is folded into B when an
adapter is loaded. Same functions and arguments as the kernels.
"""
from __future__ import annotations

import torch


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """x: [T, K], lora_a: [S, R, K], slots: [T] -> [T, R] (zero rows where slots < 0)."""
    out = x.new_zeros((x.shape[0], lora_a.shape[1]))
    for slot in torch.unique(slots).tolist():   # one matmul per adapter present
        if slot < 0:
            continue
        rows = slots == slot
        out[rows] = x[rows] @ lora_a[slot].to(x.dtype).t()
    return out


def lora_shrink_partials(x: torch.Tensor, lora_a: torch.Tensor, slots: torch.Tensor
                         ) -> torch.Tensor:
    """As the kernel's: [splits, T, R] summing to the shrink; here one split, in x's dtype."""
    return lora_shrink(x, lora_a, slots).unsqueeze(0)


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
                bounds: tuple[int, ...] | None = None) -> None:
    """y[T, N] += t[T, P*R] @ lora_b[slot]^T per row (lora_b: [S, N, R]); piece p (output
    columns [bounds[p], bounds[p+1])) takes t's columns [p*R, (p+1)*R); t may be partials
    [splits, T, P*R]. Rows with slot < 0 are left as they are. In place, as the kernel."""
    if t.dim() == 3:
        t = t.sum(0)
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = slots == slot
            _add_pieces(y, rows, t[rows], lora_b[slot], bounds)


def lora_expand_stacked(base: torch.Tensor, t_all: torch.Tensor, lora_b: torch.Tensor,
                        slots: torch.Tensor, bounds: tuple[int, ...] | None = None
                        ) -> torch.Tensor:
    """A new [T, N]: ``base`` plus each slotted row's block of t_all [T, S*P*R] (slot s at
    columns [s*P*R, (s+1)*P*R)) times its B, as the kernel's."""
    out = base.clone(memory_format=torch.contiguous_format)
    block = t_all.shape[1] // lora_b.shape[0]   # P*R
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            rows = slots == slot
            _add_pieces(out, rows, t_all[rows, slot * block:(slot + 1) * block], lora_b[slot],
                        bounds)
    return out


def _add_pieces(y: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, b: torch.Tensor,
                bounds: tuple[int, ...] | None) -> None:
    """y[rows] += piece by piece t[:, p*R:(p+1)*R] @ b[lo:hi]^T (b: one slot's [N, R])."""
    rank = b.shape[1]
    bounds = tuple(bounds) if bounds is not None else (0, y.shape[1])
    for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        tp = t[:, p * rank:(p + 1) * rank].to(b.dtype)
        y[rows, lo:hi] += (tp @ b[lo:hi].t()).to(y.dtype)
