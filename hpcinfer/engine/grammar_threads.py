"""xgrammar's per-step calls (accept a token, fill a bitmask) over a step's rows, split across
threads without starving them of the GIL.

xgrammar >= 0.2 calls its C++ through tvm-ffi, which releases the GIL in every call, so
several of its calls can run on several cores at once. What decides whether threads pay is
when each one takes the GIL back. CPython hands the GIL to a waiting thread only when the
holder blocks or, after the switch interval (5 ms), if the holder has not dropped and
re-taken it meanwhile; a step loop that calls torch often drops and re-takes it every few
microseconds, so a helper thread waiting for the GIL beside a busy step loop waits until the
loop blocks. Measured on the 2-core VM (2026-12-05, 256 JSON rows): a thread of batched
accepts beside a Python loop that called a small torch op every 50 us took 25-43 ms a call
instead of 0.16 ms; setting the switch interval to 0.1 ms changed nothing. That is why a
background job that accepted a launched step's tokens and filled the next masks beside the
step loop (``prefetch``, removed 2026-12-05) lost on the H200s (json_extraction 0.62 of free
rows with it, 0.75 without: its fills took 14 us a row against 7 on the step loop), and why
accepts sharded over threads were 5x slower there than one call.

So the calls here run only while the step loop waits for them: ``ChunkRunner.map`` gives
chunk 0 to the calling thread and the others to helper threads, and the caller then waits
for the helpers (a wait that releases the GIL), so a helper's re-take never competes with
the step loop. And a call's result is read holding the GIL (``batch_accept_call``): xgrammar's
wrapper reads a batched accept's result with one tvm-ffi call per row, each releasing the
GIL, 256 re-takes per step that contend with the helpers.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ChunkRunner:
    """Runs ``fn(0), ..., fn(n - 1)`` at once: ``fn(0)`` on the calling thread, the others on
    up to ``max_threads - 1`` helper threads (started at the first split call). ``fn`` must
    spend its time in calls that release the GIL."""

    def __init__(self, max_threads: int, name: str):
        self.max_threads = max(1, max_threads)
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def chunks(self, num_rows: int, rows_per_chunk: int) -> int:
        """How many chunks ``num_rows`` rows make at about ``rows_per_chunk`` rows each (at
        least 1, at most one per thread)."""
        return max(1, min(self.max_threads, num_rows // max(1, rows_per_chunk)))

    def map(self, fn: Callable[[int], T], num_chunks: int) -> list[T]:
        if num_chunks <= 1:
            return [fn(0)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_threads - 1, thread_name_prefix=self._name)
        futures = [self._pool.submit(fn, j) for j in range(1, num_chunks)]
        first = fn(0)
        return [first] + [f.result() for f in futures]


def deal(items: list, num_chunks: int, j: int) -> list:
    """Chunk ``j`` of ``num_chunks``: items j, j + n, j + 2n, ... Dealt rather than cut in runs,
    so that rows in costly grammar states, which come in runs of similar requests, spread
    over the chunks."""
    return items[j::num_chunks]


def undeal(parts: list[list], total: int) -> list:
    """The inverse of ``deal``: the items of ``parts`` (chunk j's from ``deal(..., j)``) back
    in their original order."""
    out: list = [None] * total
    for j, part in enumerate(parts):
        out[j::len(parts)] = part
    return out


def batch_accept_call(xgr) -> Callable[[list, list[int]], list[bool]]:
    """``accept(matchers, tokens) -> list[bool]``: xgrammar's batched accept, its result read
    while holding the GIL (~0.5 us a row, a getter of our own: tvm-ffi's are shared). Older
    xgrammar (nanobind, a list back) and any other layout take the public call."""
    public = xgr.BatchGrammarMatcher.batch_accept_token
    try:
        import tvm_ffi
        core = xgr.matcher._core.BatchGrammarMatcher.batch_accept_token
        get_item = tvm_ffi.get_global_func("ffi.ArrayGetItem")   # a wrapper of our own
        get_item.release_gil = False
    except (ImportError, AttributeError, ValueError, RuntimeError):
        return public

    def accept(matchers: list, tokens: list[int]) -> list[bool]:
        result = core([m._handle for m in matchers], tokens, False)
        if isinstance(result, list):
            return [bool(ok) for ok in result]
        return [bool(get_item(result, i)) for i in range(len(matchers))]
    return accept
