"""bench/gc_pauses.py: collections inside the block are counted and timed by generation, and
the callback is gone afterwards."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gc_pauses as mod  # noqa: E402


def test_collections_in_the_block_are_counted_by_generation():
    before = len(gc.callbacks)
    with mod.gc_pauses() as found:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    assert found["count"] >= 3
    assert found["by_generation"]["2"][0] >= 2 and found["by_generation"]["0"][0] >= 1
    assert found["total_ms"] >= found["max_ms"] > 0
    assert len(gc.callbacks) == before
    counted = found["count"]
    gc.collect(2)   # after the block: not counted
    assert found["count"] == counted
