"""Python's garbage-collector pauses during a timed run: how many, how long in all, the
longest, by generation (gc.callbacks). A collection holds the GIL, so the step loop stands
still for its length; the GPU runs out of queued work if it is longer than that. Used by
bench/throughput.py and bench/vision.py (their rows' ``gc_pauses``)."""
from __future__ import annotations

import contextlib
import gc
import time


@contextlib.contextmanager
def gc_pauses():
    """with gc_pauses() as found: ...; then found = {"count", "total_ms", "max_ms",
    "by_generation": {gen: [count, total_ms]}}."""
    found: dict = {"count": 0, "total_ms": 0.0, "max_ms": 0.0, "by_generation": {}}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
            return
        if not started:
            return
        ms = (time.perf_counter() - started.pop()) * 1e3
        found["count"] += 1
        found["total_ms"] += ms
        found["max_ms"] = max(found["max_ms"], ms)
        gen = found["by_generation"].setdefault(str(info.get("generation")), [0, 0.0])
        gen[0] += 1
        gen[1] += ms

    gc.callbacks.append(callback)
    try:
        yield found
    finally:
        gc.callbacks.remove(callback)
        found["total_ms"] = round(found["total_ms"], 2)
        found["max_ms"] = round(found["max_ms"], 2)
        for gen in found["by_generation"].values():
            gen[1] = round(gen[1], 2)
