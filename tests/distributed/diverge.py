"""SPMD misuse: rank 1 gives LLM other prompts than rank 0. Run as
``mpirun -n 2 python diverge.py CHECKPOINT``: it must fail fast with a clear message."""
import sys

from mpi4py import MPI

from hpcinfer import LLM, SamplingParams

rank = MPI.COMM_WORLD.Get_rank()
llm = LLM(sys.argv[1], device="cpu", dtype="float32", tensor_parallel_size=2)
prompts = ["Hello, my name is"] if rank == 0 else ["A much longer prompt on rank one only"]
try:
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
except RuntimeError as e:
    print(f"rank {rank}: {e}", flush=True)
    MPI.COMM_WORLD.Abort(2)
print("no error", flush=True)
