"""bench/host_step.py runs end to end on a few rows and writes result rows with the keys every
bench row has, one per way of handling text."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "host_step.py"


def test_host_step_writes_one_row_per_mode(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--rows", "8", "--max-tokens", "12",
                          "--rounds", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [path] = tmp_path.glob("host_step-*.json")
    rows = json.loads(path.read_text())
    assert [r["workload"] for r in rows] == ["host-step-text", "host-step-no_text",
                                            "host-step-stop"]
    for row in rows:
        assert {"engine", "workload", "tp", "output_tok_s", "total_tok_s", "device",
                "date"} <= row.keys()
        assert 0 < row["host_ms_per_step"]["median"] and row["output_tok_s"] > 0
