"""Host data to the GPU without the host waiting for the GPU.

Why: a copy from pageable memory (``t.to("cuda")``, ``torch.tensor(list, device="cuda")``,
``dst.copy_(numpy_backed_tensor, non_blocking=True)``) returns only when the GPU has run
everything queued before it. Inside a step that is the step in flight: the host stops, and
async scheduling (engine/inflight.py) loses the lead it keeps over the GPU. The H200 trace of
workload V (2026-12-04) had the vision tower's two small index copies doing this in every
encoder call; LoRA's per-step slot copy did it in every step. A copy from pinned memory is
queued like a kernel, and torch's pinned allocator keeps the buffer until the copy has run.
"""
from __future__ import annotations

from typing import Any

import torch


def to_device(data: Any, device: torch.device | str, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """``data`` (a tensor, numpy array or list on the host) as a tensor on ``device``, queued
    behind the device's work instead of waiting for it."""
    device = torch.device(device)
    t = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda" or t.device.type != "cpu":   # nothing to pin (already on a device)
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, data: Any) -> torch.Tensor:
    """``dst.copy_(data)`` for host ``data`` into a device tensor (a persistent buffer that
    CUDA graphs read), queued the same way."""
    t = torch.as_tensor(data, dtype=dst.dtype)
    if dst.device.type != "cuda" or t.device.type != "cpu":
        return dst.copy_(t)
    return dst.copy_(t.pin_memory(), non_blocking=True)
