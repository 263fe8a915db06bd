"""NCCL check on a machine with >= 2 GPUs (not CI): spawned TP=2, PP=2 (one process asking
for the ranks) give the TP=1 greedy tokens, fp32 and bf16, per tiny family; prints a JSON
verdict. Run as ``python tests/distributed/gpu_check.py OUT_DIR`` (see run_gpu_checks.sh's
shim for importing hpcinfer.kernels from a source tree)."""
import json
import os
import sys
import time

import torch

from hpcinfer import SamplingParams
from hpcinfer.testing.distributed import PROMPTS
from hpcinfer.testing.tiny import build_tiny_checkpoint

out_dir = sys.argv[1]
params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
verdict = {"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0)}
for family in ("llama3", "gemma", "opt"):
    path = str(build_tiny_checkpoint(family, os.path.join("/tmp/hpcinfer-gpu-check", family)))
    for dtype in ("float32", "bfloat16"):
        runs = {}
        for name, kw in (("tp1", {}), ("tp2", {"tensor_parallel_size": 2}),
                         ("pp2", {"pipeline_parallel_size": 2})):
            code = (
                "import json, sys\nfrom hpcinfer import LLM, SamplingParams\n"
                "from hpcinfer.testing.distributed import PROMPTS\n"
                f"llm = LLM({path!r}, dtype={dtype!r}, device='cuda', block_size=16, "
                f"num_gpu_blocks_override=12, max_model_len=128, **{kw!r})\n"
                "outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, "
                "ignore_eos=True), use_tqdm=False)\n"
                "print('TOKENS ' + json.dumps([o.outputs[0].token_ids for o in outs]))\n")
            import subprocess
            t = time.time()
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=240)
            line = [x for x in proc.stdout.splitlines() if x.startswith("TOKENS ")]
            runs[name] = json.loads(line[0][7:]) if line else proc.stderr[-1500:]
            verdict[f"{family}/{dtype}/{name}/seconds"] = round(time.time() - t, 1)
        for name in ("tp2", "pp2"):
            same = runs[name] == runs["tp1"]
            if not same and isinstance(runs[name], list):
                same = f"{sum(a == b for a, b in zip(runs[name], runs['tp1']))}/{len(PROMPTS)} prompts equal"
            verdict[f"{family}/{dtype}/{name}"] = same if not isinstance(runs[name], str) else runs[name]
        print(family, dtype, {k: v for k, v in verdict.items() if k.startswith(f"{family}/{dtype}")}, flush=True)
print(json.dumps(verdict, indent=1), flush=True)
with open(os.path.join(out_dir, "gpu_verdict.json"), "w") as f:
    json.dump(verdict, f, indent=1)
