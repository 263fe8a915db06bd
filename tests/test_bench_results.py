"""Every committed benchmark result carries the keys the project's reports rely on."""
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
REQUIRED = ("engine", "workload", "tp", "output_tok_s", "total_tok_s", "device", "date")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_bench_rows_have_the_common_keys(path):
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows, f"{path.name}: expected a non-empty list of rows"
    for i, row in enumerate(rows):
        missing = [key for key in REQUIRED if key not in row]
        assert not missing, f"{path.name} row {i}: missing {missing}"
