"""SPMD: every rank runs this under a launcher (srun / mpirun) and prints the same tokens.
``python spmd_generate.py CHECKPOINT TP PP``"""
import json
import os
import sys

from hpcinfer import LLM, SamplingParams

llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=int(sys.argv[2]),
          pipeline_parallel_size=int(sys.argv[3]))
outs = llm.generate(["Hello, my name is", "Slurm schedules jobs"],
                    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                    use_tqdm=False)
rank = os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
print(f"TOKENS rank={rank} " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
