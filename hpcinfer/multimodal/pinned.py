"""Pixels pinned on the preprocessing threads, so a step only queues their copy to the GPU.

Why: an image's pixels must be in page-locked memory for the step loop to queue their copy
without waiting for the GPU (multimodal/step.py, layers/transfer.py). Pinning there copied
~70 MB a step on workload V (29 images of 448x448 in bf16) on the step loop's thread: 5-13 ms
each time, while the GPU sat idle (the H200 trace of 2026-12-04: in 14 of the 25 largest of
its GPU gaps, ~0.3 s of V's 2 s of GPU idle). Pinned here, on the
thread that preprocessed the image, the copy runs beside the step loop (torch releases the
GIL in it) and ``Tensor.pin_memory`` in the step is a no-op.

Page-locked memory is taken from the machine, and a generate of 10,000 images would pin them
all at once: a budget (``HPCINFER_PINNED_PIXELS_GIB``, default 2 GiB, 0 = never) caps what is
pinned and not yet freed; past it pixels stay pageable and the step pins them as before.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

GiB = 1 << 30
DEFAULT_GIB = 2.0


def budget_bytes() -> int:
    value = os.environ.get("HPCINFER_PINNED_PIXELS_GIB", "")
    try:
        gib = float(value) if value else DEFAULT_GIB
    except ValueError:
        raise ValueError(f"HPCINFER_PINNED_PIXELS_GIB={value!r}: give a number of GiB "
                         "(0 = pin no pixels ahead of the step)") from None
    return max(int(gib * GiB), 0)


class PinnedBudget:
    """Pins tensors while the bytes pinned through it and still alive stay within a cap."""

    def __init__(self, cap_bytes: int, pin=torch.Tensor.pin_memory):
        self.cap = cap_bytes
        self._pin = pin   # (tests on a machine without CUDA pass a stand-in)
        self.used = 0
        self._lock = threading.Lock()

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in pinned memory when it fits the budget, else ``t`` itself."""
        nbytes = t.numel() * t.element_size()
        with self._lock:
            if self.used + nbytes > self.cap:
                return t
            self.used += nbytes
        try:
            pinned = self._pin(t)
        except RuntimeError:    # no CUDA driver here, or page-locking refused: stay pageable
            self._release(nbytes)
            return t
        weakref.finalize(pinned, self._release, nbytes)
        return pinned

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes
