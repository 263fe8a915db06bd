"""worker/prefetch.py: rows are read and transformed in one reader thread, in order, at most
``depth`` ahead; a reader error is raised in the loop's thread in its place; close() stops
the thread even when the queue is full."""
from __future__ import annotations

import threading
import time

import pytest

from hpcinfer.io.readers import ShardReadError
from hpcinfer.worker.prefetch import Prefetch


def test_rows_come_in_order_transformed_in_the_reader_thread():
    threads = set()

    def transform(x):
        threads.add(threading.current_thread().name)
        return x * 10

    assert list(Prefetch(iter(range(50)), transform, depth=3)) == [x * 10 for x in range(50)]
    assert threads == {"row-reader"}


def test_depth_bounds_how_far_the_reader_runs_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    rows = Prefetch(items(), lambda x: x, depth=4)
    time.sleep(0.3)
    # depth rows in the queue, one more held by the blocked put
    assert len(produced) <= 4 + 1
    assert next(rows) == 0
    rows.close()


def test_reader_error_is_raised_in_the_loop_thread_after_the_rows_before_it():
    def items():
        yield 1
        yield 2
        raise ShardReadError("f.parquet", "corrupt near row 2")

    rows = Prefetch(items(), lambda x: x, depth=8)
    assert next(rows) == 1 and next(rows) == 2
    with pytest.raises(ShardReadError, match="corrupt near row 2"):
        next(rows)


def test_close_stops_a_reader_blocked_on_a_full_queue():
    rows = Prefetch(iter(range(10**6)), lambda x: x, depth=2)
    assert next(rows) == 0
    rows.close()
    assert not rows._thread.is_alive()


def test_get_without_blocking_says_not_ready_until_the_reader_has_the_row():
    from hpcinfer.worker.prefetch import END, NOT_READY
    gate = threading.Event()

    def items():
        yield 1
        gate.wait(timeout=30)
        yield 2

    rows = Prefetch(items(), lambda x: x, depth=4)
    assert rows.get(block=True) == 1
    assert rows.get(block=False) is NOT_READY     # the reader waits for the gate
    gate.set()
    assert rows.get(block=True) == 2
    assert rows.get(block=True) is END
    assert rows.get(block=False) is END           # and stays over
    with pytest.raises(StopIteration):
        next(rows)
