"""bench/trace_gaps.py: GPU busy time is the union of kernel/copy intervals, the gaps are the
holes between them, and each large gap lists the host ops that overlap it."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import trace_gaps  # noqa: E402


def _trace():
    kernel = lambda ts, dur: {"cat": "kernel", "name": "k", "ts": ts, "dur": dur}  # noqa: E731
    return [kernel(0, 100), kernel(50, 100),            # overlap: busy 0-150
            {"cat": "gpu_memcpy", "name": "Memcpy", "ts": 170, "dur": 10},   # gap 20 us
            kernel(6180, 20),                           # gap 6000 us
            {"cat": "cpu_op", "name": "aten::tiny", "ts": 1000, "dur": 5, "tid": 7},
            {"cat": "cpu_op", "name": "aten::long", "ts": 100, "dur": 3000, "tid": 7},
            {"cat": "cpu_op", "name": "aten::after", "ts": 9000, "dur": 5, "tid": 7}]


def test_busy_time_and_gaps():
    found = trace_gaps.gpu_gaps(_trace())
    assert found["span_us"] == 6200 and found["busy_us"] == 150 + 10 + 20
    assert found["gaps"] == [(6000, 180), (20, 150)]
    ops = trace_gaps.host_ops_during(_trace(), 180, 6180)
    assert [name for name, _, _ in ops] == ["aten::long", "aten::tiny"]


def test_report_from_a_gzip_trace(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    out = subprocess.run([sys.executable, str(BENCH / "trace_gaps.py"), str(path), "--top", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "GPU span 6.2 ms, busy 0.2 ms (3%), idle 6.0 ms in 2 gaps" in out
    assert "gaps > 5 ms: 1, 6.0 ms" in out and "gaps 0-0.05 ms: 1, 0.0 ms" in out
    assert "6.00 ms at +0.2 ms: aten::long 3.00 ms (tid 7), aten::tiny" in out
