"""The distributed engine path in a world of one (HPCINFER_FORCE_DISTRIBUTED=1): a real
process group (gloo here; NCCL on a GPU, tests/gpu/test_nccl_world1.py), the TP/PP groups,
DistributedRunner and DistributedSampler drive the engine, and every tiny family's greedy
tokens equal the plain single-process engine's, with preemption and prefix caching on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from hpcinfer.testing.tiny import TINY_FAMILIES

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HPCINFER_FORCE_DISTRIBUTED"):
    ENV.pop(_name, None)

# In a fresh interpreter: the process group it creates must not leak into the test process.
SCRIPT = """
import json, os, sys
import torch.distributed as dist
from hpcinfer.testing.distributed import generate
from hpcinfer.testing.tiny import build_tiny_checkpoint
root, families = sys.argv[1], sys.argv[2:]
paths = {f: str(build_tiny_checkpoint(f, os.path.join(root, f))) for f in families}
plain = {f: generate(p) for f, p in paths.items()}
assert not dist.is_initialized()
os.environ["HPCINFER_FORCE_DISTRIBUTED"] = "1"
from hpcinfer import LLM
from hpcinfer.engine.distributed_runner import DistributedRunner, DistributedSampler
engine = LLM(paths[families[0]], device="cpu", dtype="float32").llm_engine
path_facts = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
              "runner": type(engine.runner).__name__, "sampler": type(engine.sampler).__name__}
forced = {f: generate(p) for f, p in paths.items()}
print("RESULT " + json.dumps({"plain": plain, "forced": forced, "path": path_facts}))
"""


def test_world_of_one_runs_the_distributed_path_with_equal_tokens(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *TINY_FAMILIES],
                          env=ENV, capture_output=True, text=True, timeout=240, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][7:])
    assert result["path"] == {"backend": "gloo", "world_size": 1,
                              "runner": "DistributedRunner", "sampler": "DistributedSampler"}
    for family in TINY_FAMILIES:
        (plain, plain_stats), (forced, forced_stats) = (result["plain"][family],
                                                        result["forced"][family])
        assert forced == plain, family
        assert forced_stats == plain_stats and plain_stats["preemptions"] > 0 \
            and plain_stats["prefix_hits"] > 0, (family, plain_stats, forced_stats)
