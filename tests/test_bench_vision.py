"""bench/vision.py (issue 24's workload V) end to end on CPU at its tiny shape (workload VT):
the checkpoint, tokenizer and image processor are built offline, both engines run in their
own subprocesses on the same seeded images, and each writes its row (hpcinfer's with
--profile's step counters and profiled run).

float32 on CPU with the same weights, processor and prompts: the engines' first generated
tokens must agree on every image, so a bench that fed the engines different inputs (another
image order, another prompt, a processor that counts image tokens differently) fails here.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vision.py"
REQUIRED = ("engine", "workload", "tp", "output_tok_s", "total_tok_s", "device", "date",
            "images", "image_tokens_per_image", "startup_s")


def test_workload_vt_writes_both_engines_rows(tmp_path):
    out = tmp_path / "out"
    # transformers times a subset (3 of 4 images, batches of 2: one padded batch of one)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--workload", "VT", "--device", "cpu", "--out", str(out),
         "--ckpt-root", str(tmp_path / "ckpt"), "--hf-images", "3", "--hf-batch-size", "2",
         "--profile", "--trace", str(tmp_path / "trace.json.gz")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = out.glob("vision-cpu-*.json")
    rows = {r["engine"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"hpcinfer", "transformers"}
    for engine, row in rows.items():
        assert not [k for k in REQUIRED if k not in row], (engine, row)
        assert row["workload"] == "VT" and row["tp"] == 1
        assert row["image_tokens_per_image"] == 16   # 112 px: 8x8 patches, 2x2 merged
        assert row["exact_tokens"] and row["output_tok_s"] > 0
        assert row["num_output_tokens"] == row["images"] * 8
        assert row["total_tok_s"] > row["output_tok_s"]
    assert rows["hpcinfer"]["images"] == 4 and not rows["hpcinfer"]["subset"]
    assert rows["transformers"]["images"] == 3 and rows["transformers"]["subset"]
    assert rows["transformers"]["images_total"] == 4
    # every prompt holds its image's 16 tokens: same prompt tokens per image in both engines
    per_image = {e: r["num_input_tokens"] / r["images"] for e, r in rows.items()}
    assert per_image["hpcinfer"] == per_image["transformers"] > 16
    assert rows["transformers"]["first_token_agreement_vs_hpcinfer"] == 1.0
    assert "hpcinfer / transformers output tok/s on VT" in proc.stdout
    # --profile: hpcinfer's step counters, and the profiled second run (images encoded again)
    assert set(rows["hpcinfer"]["preprocess"]) == {"workers", "images_by_workers"}
    steps, profile = rows["hpcinfer"]["engine_steps"], rows["hpcinfer"]["profile"]
    assert steps["num_steps"] > steps["num_decode_steps"] > 0
    assert profile["encoder_calls"] >= 1 and profile["wall_s"] > 0
    with gzip.open(tmp_path / "trace.json.gz") as trace:   # --trace: a Chrome trace
        assert any(e.get("name") == "hpcinfer.encode_images"
                   for e in json.load(trace)["traceEvents"])
