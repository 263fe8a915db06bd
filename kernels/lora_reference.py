"""Torch reference of the batched LoRA "shrink" and "expand" (hpcinfer.kernels.lora).

Every token row carries the slot of its adapter in the slot pool (-1: no adapter). Shrink
projects each row onto its adapter's A, expand adds that times its adapter's B to the
output. Runs on any device; the CPU engine uses it and the Triton kernels are tested
against it. Scaling (lora_alpha / r) is folded into B when an adapter is loaded.
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


def lora_expand(y: torch.Tensor, t: torch.Tensor, lora_b: torch.Tensor,
                slots: torch.Tensor) -> None:
    """y[T, N] += t[T, R] @ lora_b[slot]^T per row (lora_b: [S, N, R]); rows with slot < 0
    are left as they are. In place, as the kernel."""
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        rows = slots == slot
        y[rows] += (t[rows] @ lora_b[slot].to(t.dtype).t()).to(y.dtype)
