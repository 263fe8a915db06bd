"""Appending a run's rows to a bench/results/*.json file (a JSON list; earlier runs are kept).

Every row carries at least engine, workload, tp, output_tok_s, total_tok_s, device and date
(tests/test_bench_results.py checks the committed files).
"""
from __future__ import annotations

import json
from pathlib import Path


def append_rows(path: Path, rows: list[dict], indent: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(existing + rows, indent=indent) + "\n")
    return path
