"""SPMD: every rank runs this (under mpirun, or alone for the reference) and writes the
prompt logprobs it got. ``python prompt_logprobs_spmd.py CHECKPOINT TP PP OUT_DIR`` writes
OUT_DIR/rank<r>.json: per prompt, per position, [[token_id, logprob, rank], ...]."""
import json
import os
import sys
from pathlib import Path

from hpcinfer import LLM, SamplingParams

# 16-token chunks: the 40-token prompt is prefilled over three steps.
llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=int(sys.argv[2]),
          pipeline_parallel_size=int(sys.argv[3]), max_num_batched_tokens=16)
prompts = [list(range(10, 50)), [7, 8, 9, 10, 11], list(range(100, 120))]
params = [SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=k) for k in (3, 0)]
outs = llm.generate(prompts, [params[0], params[1], params[0]], use_tqdm=False)
got = [[None if e is None else [[t, lp.logprob, lp.rank] for t, lp in e.items()]
        for e in o.prompt_logprobs] for o in outs]
rank = os.environ.get("OMPI_COMM_WORLD_RANK", "0")
Path(sys.argv[4], f"rank{rank}.json").write_text(json.dumps(got))
