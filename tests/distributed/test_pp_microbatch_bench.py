"""bench/throughput.py --tp/--pp/--dp (bench/parallel_variants.py) on CPU at the tiny shape:
the TP/PP/DP plumbing (spawned ranks over gloo, replicas on shards of the prompts, combined
rows with tp/pp/dp and scaling efficiency), without a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _variants_module():
    spec = importlib.util.spec_from_file_location("parallel_variants",
                                                  BENCH / "parallel_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layouts_gpus_and_replica_combination():
    pv = _variants_module()
    assert pv.variants(2, 1, 1, False) == [{"tp": 2, "pp": 1, "dp": 1}]
    assert pv.variants(2, 2, 2, False) == [{"tp": 2, "pp": 1, "dp": 1},
                                           {"tp": 1, "pp": 2, "dp": 1},
                                           {"tp": 1, "pp": 1, "dp": 2}]
    assert pv.variants(2, 2, 1, True) == [{"tp": 2, "pp": 2, "dp": 1}]
    with pytest.raises(ValueError, match="--dp 0"):
        pv.variants(1, 1, 0, False)
    layout = {"tp": 2, "pp": 1, "dp": 2}
    assert pv.replica_gpus(layout, 1, ["4", "5", "6", "7"]) == ["6", "7"]
    with pytest.raises(ValueError, match="4 GPUs wanted but 2 are visible"):
        pv.replica_gpus(layout, 0, ["0", "1"])
    row = pv.combine_replicas([
        {"wall_s": 2.0, "num_output_tokens": 100, "num_input_tokens": 50, "load_s": 3.0,
         "output_tok_s": 50.0},
        {"wall_s": 4.0, "num_output_tokens": 100, "num_input_tokens": 30, "load_s": 5.0,
         "output_tok_s": 25.0}])
    assert row["output_tok_s"] == 50.0 and row["total_tok_s"] == 70.0   # over the slowest
    assert row["load_s"] == 5.0 and row["replica_output_tok_s"] == [50.0, 25.0]


def test_cpu_tiny_tp_pp_dp_rows(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--workloads", "T",
                           "--device", "cpu", "--tp", "2", "--pp", "2", "--dp", "2",
                           "--num-prompts", "8", "--out", str(tmp_path / "results"),
                           "--ckpt-root", str(tmp_path / "ckpt")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "results").glob("*.json")
    rows = json.loads(results.read_text())
    assert [(r["tp"], r["pp"], r["dp"], r["gpus"]) for r in rows] == [
        (1, 1, 1, 1), (2, 1, 1, 2), (1, 2, 1, 2), (1, 1, 2, 2)]
    want_tokens = rows[0]["num_output_tokens"]
    for r in rows:
        assert "error" not in r, r
        for key in ("engine", "workload", "output_tok_s", "total_tok_s", "device", "date",
                    "load_s", "scaling_efficiency"):
            assert r.get(key) is not None, (key, r)
        assert r["num_output_tokens"] == want_tokens   # every layout generated every token
    assert len(rows[3]["replica_output_tok_s"]) == 2
