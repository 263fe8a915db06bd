"""Peak RSS of each rank while it loads its tensor-parallel slice of a checkpoint: run as
``mpirun -n N python load_rss.py CHECKPOINT WARMUP_CHECKPOINT`` ; rank 0 prints one JSON line.

The warm-up load of a small checkpoint of the same family first pays the one-time costs of a
first load (module imports, lazily built torch state), which vary by a few tens of MB from run
to run and are not weights; the measured load then shows what the weights cost."""
import json
import sys

import torch
from mpi4py import MPI

from hpcinfer.distributed.groups import make_groups
from hpcinfer.distributed.world import init_world
from hpcinfer.models.registry import load_config, load_model


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


world = init_world(device="cpu")
groups = make_groups(world, world.size, 1)
load_config(sys.argv[1])  # imports transformers: its memory is not the weights
warmup = load_model(sys.argv[2], dtype=torch.float32, device="cpu", attention_backend="torch_ref",
                    tp=groups.tp)
del warmup
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = rss_kib("VmRSS")
model = load_model(sys.argv[1], dtype=torch.float32, device="cpu", attention_backend="torch_ref",
                   tp=groups.tp)
params = sum(p.numel() * p.element_size() for p in model.parameters())
peak = rss_kib("VmHWM")
rows = MPI.COMM_WORLD.gather({"rank": world.rank, "peak_delta": (peak - before) * 1024,
                              "param_bytes": params}, root=0)
if world.rank == 0:
    print("RESULT " + json.dumps(rows), flush=True)
