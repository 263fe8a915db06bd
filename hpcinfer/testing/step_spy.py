"""A look at every batch the engine builds, for tests of what a step carries."""
from __future__ import annotations

from typing import Any, Callable


def watch_prepared(runner, read: Callable[[Any], Any]) -> list:
    """Wrap ``runner.prepare`` so that each batch it builds also appends ``read(batch)`` to
    the returned list (one entry per step, in order); the batch itself is unchanged."""
    seen: list = []
    prepare = runner.prepare

    def spy(*args, **kwargs):
        batch = prepare(*args, **kwargs)
        seen.append(read(batch))
        return batch

    runner.prepare = spy
    return seen
