"""The NCCL path at world size 1 on one GPU (issue 9): HPCINFER_FORCE_DISTRIBUTED=1 makes the
engine create a real NCCL process group of one rank and run through the distributed code
(TP/PP groups, DistributedRunner, DistributedSampler over the gloo side group), with Triton
and decode CUDA graphs (the distributed runner captures graphs when its forward holds no
collective, which is the case in a world of one; with TP or PP peers it runs eagerly).

The checks are those of test_engine_gpu.py: fp32 tiny models of every family give
transformers' greedy tokens, graphs on; graphs vs eager equal while the batch shrinks.
Each engine runs in its own interpreter (a process group is per process, and the GPU runner
may run tests in parallel). Not part of CI: run through tests/gpu/run_gpu_checks.sh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hpcinfer.testing.greedy import MAX_NEW, hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only: run tests/gpu/run_gpu_checks.sh on a GPU")

SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from hpcinfer import LLM, SamplingParams
path, prompts, max_tokens, kwargs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, **kwargs)
params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
engine = llm.llm_engine
probe = torch.ones(4, device="cuda")
dist.all_reduce(probe)                      # the NCCL communicator itself works
graphs = engine.runner.graphs
print("RESULT " + json.dumps({
    "tokens": [o.outputs[0].token_ids for o in outs], "backend": dist.get_backend(),
    "world_size": dist.get_world_size(), "runner": type(engine.runner).__name__,
    "sampler": type(engine.sampler).__name__, "probe": probe.tolist(),
    "graph_replays": graphs.num_replays if graphs is not None else None}))
"""


def _run_world_of_one(path: str, prompts, max_tokens, **kwargs) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["HPCINFER_FORCE_DISTRIBUTED"] = "1"
    # NVLink multicast stays off (device notes: it can take a shared host's GPUs out of service)
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, path, json.dumps(prompts),
                           json.dumps(max_tokens), json.dumps(kwargs)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][7:])
    assert (result["backend"], result["world_size"]) == ("nccl", 1), result
    assert (result["runner"], result["sampler"]) == ("DistributedRunner", "DistributedSampler")
    assert result["probe"] == [1.0] * 4
    return result


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma",
                                    "opt"])
def test_nccl_world1_fp32_greedy_matches_transformers_with_graphs(family):
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint(family))
    prompts = random_prompts()
    result = _run_world_of_one(path, prompts, [MAX_NEW] * len(prompts), max_num_seqs=16)
    assert result["graph_replays"] is not None and result["graph_replays"] >= MAX_NEW - 1
    want = hf_greedy(path, prompts)
    for i, (g, w) in enumerate(zip(result["tokens"], want)):
        assert g == w, f"{family} prompt {i} (len {len(prompts[i])}): engine {g} != HF {w}"


def test_nccl_world1_graphs_match_eager_while_batch_shrinks():
    from hpcinfer.testing.tiny import tiny_checkpoint
    path = str(tiny_checkpoint("llama3"))
    prompts = random_prompts(seed=3)
    max_tokens = [4 + 5 * i for i in range(len(prompts))]
    graphs = _run_world_of_one(path, prompts, max_tokens)
    eager = _run_world_of_one(path, prompts, max_tokens, enforce_eager=True)
    assert graphs["graph_replays"] > 0 and eager["graph_replays"] is None
    assert graphs["tokens"] == eager["tokens"]
