"""Memory stays flat: 200k rows of Parquet and of JSONL read, validated, written and committed
through the data path in a fresh subprocess; peak RSS minus RSS before the first row < 100 MB.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcinfer.testing.io_corpus import good_row

NUM_ROWS = 200_000
LIMIT_MB = 100

# Runs in a fresh interpreter: RSS (from /proc, no psutil) after imports, peak after the run.
_CHILD = r"""
import sys, types
from hpcinfer.io import ledger
from hpcinfer.io.formats import make_format
from hpcinfer.io.rows import InputSpec
from hpcinfer.io.shard_loop import process_shard
from hpcinfer.testing.io_corpus import reverse_answer
import pyarrow.parquet

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

path, job, fmt, num_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
spec = InputSpec(id_field="id", prompt_field="prompt", sampling_field="sampling",
                 passthrough=("topic",))
before_kb = status_kb("VmRSS")
summary = process_shard(types.SimpleNamespace(file=path, start=0, stop=num_rows), spec,
                        ledger.shard_dir(job, 0),
                        make_format(fmt, id_name="id", passthrough=("topic",)),
                        reverse_answer, commit_every_rows=1000)
assert summary["num_results"] == num_rows, summary
print(before_kb, status_kb("VmHWM"))
"""


def _write_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    jsonl = tmp_path / "in.jsonl"
    with open(jsonl, "w") as f:
        for i in range(NUM_ROWS):
            f.write(json.dumps(good_row(i)) + "\n")
    parquet = tmp_path / "in.parquet"
    chunk = 20_000
    schema = pa.Table.from_pylist([good_row(0)]).schema
    with pq.ParquetWriter(parquet, schema) as w:
        for start in range(0, NUM_ROWS, chunk):
            rows = [good_row(i) for i in range(start, start + chunk)]
            w.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=10_000)
    return jsonl, parquet


@pytest.mark.timeout(120)
def test_rss_growth_is_flat_for_200k_rows(tmp_path):
    jsonl, parquet = _write_inputs(tmp_path)
    for path, fmt in ((jsonl, "jsonl"), (parquet, "parquet")):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / fmt),
                               fmt, str(NUM_ROWS)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        before_kb, peak_kb = map(int, proc.stdout.split())
        growth_mb = (peak_kb - before_kb) / 1024
        print(f"{fmt}: RSS before {before_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB, "
              f"growth {growth_mb:.1f} MB")
        assert growth_mb < LIMIT_MB, f"{fmt}: RSS grew {growth_mb:.0f} MB over {NUM_ROWS} rows"
