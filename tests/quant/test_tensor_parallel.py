"""TP=2 over gloo (LLM spawning its second rank) gives the single-process tokens for quantized
checkpoints: block scales and packed 4-bit tensors sliced per rank, per-piece scales of the
merged q/k/v, desc_act's g_idx with all groups kept on row-parallel ranks, online FP8,
bitsandbytes weights dequantized whole then sliced, and Phi-3's fused qkv_proj /
gate_up_proj split into pieces before each rank takes its slice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "tp_generate.py"
FORMATS = ("fp8_block", "ct_fp8_tensor_static", "awq", "gptq_asym_desc_act", "ct_w4a16_asym")
PHI3_FORMATS = ("fp8_block", "awq", "gptq_asym_desc_act")


@pytest.mark.slow
def test_two_ranks_give_the_single_process_tokens(quantized, base_dir, prompts,
                                                  engine_tokens, bnb):
    cases = {quantized(fmt)[0]: fmt for fmt in FORMATS}
    cases.update({str(bnb(fmt)[0]): fmt for fmt in ("bnb_nf4_double", "bnb_int8")})
    cases.update({quantized(fmt, "phi3")[0]: f"phi3 {fmt}" for fmt in PHI3_FORMATS})
    cases[f"{base_dir}@fp8"] = "online fp8"
    cases[f"{base_dir}@bitsandbytes"] = "online bitsandbytes (nf4)"
    want = {}
    for arg in cases:
        path, _, quantization = arg.partition("@")
        want[arg], _ = engine_tokens(path, quantization=quantization or None)
    max_new = len(next(iter(want.values()))[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(prompts), str(max_new),
                           *cases], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TOKENS "))
    got = json.loads(line.removeprefix("TOKENS "))
    for arg, fmt in cases.items():
        assert got[arg] == want[arg], f"{fmt}: TP=2 {got[arg]} != TP=1 {want[arg]}"
