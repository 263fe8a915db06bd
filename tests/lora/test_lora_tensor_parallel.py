"""TP=2 over gloo (LLM spawning its second rank): a mixed batch of adapters and base rows gives
transformers + peft's tokens, as one process does. Column layers keep their rows of B, row
layers (o_proj, down_proj) their columns of A with the shrink all-reduced; the adapter
requests reach the spawned rank through the replay channel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing.tiny_lora import ATTENTION, MLP

SCRIPT = Path(__file__).resolve().parent / "tp_generate.py"
MAX_NEW = 8


@pytest.mark.slow
def test_two_ranks_give_the_peft_tokens(base, adapter, oracle, prompts, shrink):
    family = "llama3"   # 2 KV heads: one per rank
    adapters = [["all-r8-rs", 1, adapter(family, "all-r8-rs", rank=8, alpha=4.0,
                                         use_rslora=True, targets=ATTENTION + MLP, seed=12)],
                ["mlp-r16", 2, adapter(family, "mlp-r16", rank=16, alpha=16.0,
                                       targets=("gate_proj", "down_proj"), seed=13)],
                ["qv-r4", 3, adapter(family, "qv-r4", rank=4, alpha=8.0,
                                     targets=("q_proj", "v_proj"), seed=11)]]
    rows = [[p, i] for p in prompts for i in (0, 1, 2, None)]
    spec = {"base": base(family), "adapters": adapters, "rows": rows, "max_new": MAX_NEW,
            "max_loras": 2}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stacked = next(x for x in proc.stdout.splitlines() if x.startswith("STACKED "))
    assert json.loads(stacked.removeprefix("STACKED ")) == [shrink == "stacked"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TOKENS "))
    got = json.loads(line.removeprefix("TOKENS "))
    for (prompt, i), tokens in zip(rows, got):
        path = None if i is None else adapters[i][2]
        assert tokens == oracle(family, path, [prompt], MAX_NEW)[0], (len(prompt), i)
