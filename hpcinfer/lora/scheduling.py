"""How many distinct adapters run at once: never more than the slot pool holds.

The scheduler admits a waiting sequence only if its adapter is already running or fewer than
``max_loras`` adapters are; every step schedules a subset of the running sequences, so no
step needs more than ``max_loras`` slots, and the pool swaps adapters between steps instead
of failing. Sequences of other adapters wait (skipped over, keeping their order) until one
adapter's last running sequence leaves.
"""
from __future__ import annotations

from collections import Counter


class RunningAdapters:
    """Running sequences per adapter id (0: the base model, always admitted)."""

    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.counts: Counter[int] = Counter()

    def admits(self, lora_id: int) -> bool:
        return not lora_id or lora_id in self.counts or len(self.counts) < self.max_loras

    def add(self, lora_id: int) -> None:
        if lora_id:
            self.counts[lora_id] += 1

    def remove(self, lora_id: int) -> None:
        if lora_id:
            self.counts[lora_id] -= 1
            if self.counts[lora_id] <= 0:
                del self.counts[lora_id]
