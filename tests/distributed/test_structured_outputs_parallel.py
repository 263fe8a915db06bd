"""Structured outputs under tensor and pipeline parallelism (one process spawning its ranks,
gloo on CPU): every rank compiles and advances the matchers, rank 0 alone fills the masks and
samples; the outputs equal the single-process engine's, token for token."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing.tiny import tiny_checkpoint

HERE = Path(__file__).resolve().parent
FAMILY = "llama3"   # 4 heads, 2 KV heads, 2 layers: splits two ways either way
pytestmark = pytest.mark.timeout(300)


def _run(model: str, tp: int, pp: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(HERE / "structured_spmd.py"), model, str(tp),
                           str(pp)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def single_process() -> tuple[str, list[dict]]:
    model = str(tiny_checkpoint(FAMILY))
    want = _run(model, 1, 1)
    assert [r["finish_reason"] for r in want[:3]] == ["stop"] * 3
    for record in want[:2]:
        assert isinstance(json.loads(record["text"]), dict)
    return model, want


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_parallel_equals_one_process(single_process, tp, pp):
    model, want = single_process
    assert _run(model, tp, pp) == want
