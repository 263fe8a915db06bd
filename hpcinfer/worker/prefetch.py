"""Read (and decode) rows in a thread ahead of the step loop.

A job whose rows carry images decodes them with PIL while the engine steps: ``Prefetch``
runs the shard reader and ``transform`` (io/images.py ``RowImageLoader.load``) in one daemon
thread and hands the rows over through a bounded queue, at most ``depth`` rows ahead, so
memory stays flat; ``get(block=False)`` lets the loop step the engine while the next row is
still being read. The loop's thread stays the only one that talks to the engine and the
writer. An exception in the thread (``ShardReadError``) is raised again by ``__next__`` in
the loop's thread, in its place in the row order. ``close()`` stops the thread at its next
hand-over (the loop calls it when it stops early).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable

_END = object()
END = object()         # get(): the rows are over
NOT_READY = object()   # get(block=False): the next row is not read yet
_POLL_S = 0.1


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetch:
    def __init__(self, items: Iterable, transform: Callable[[Any], Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, transform),
                                        name="row-reader", daemon=True)
        self._thread.start()

    def _run(self, items: Iterable, transform: Callable[[Any], Any]) -> None:
        try:
            for item in items:
                if not self._put(transform(item)):
                    return
        except BaseException as exc:  # handed to the loop's thread, raised there
            self._put(_Raised(exc))
            return
        self._put(_END)

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        item = self.get(block=True)
        if item is END:
            raise StopIteration
        return item

    def get(self, block: bool) -> Any:
        """The next row, ``END`` after the last, or (``block=False``) ``NOT_READY`` when the
        reader has not got the next one yet: the loop then steps the engine instead of
        waiting while it still has rows to run."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return NOT_READY
        if item is _END:
            self._queue.put(_END)        # later calls end too
            return END
        if isinstance(item, _Raised):
            raise item.exc
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
