"""A world where one rank never reaches init_world(): run as
``mpirun -n N python missing_rank.py LATE_RANK TIMEOUT_S``."""
import sys
import time

from mpi4py import MPI

late, timeout_s = int(sys.argv[1]), float(sys.argv[2])
if MPI.COMM_WORLD.Get_rank() == late:
    time.sleep(600)  # stuck (a hung file system, a busy GPU ...): never checks in

from hpcinfer.distributed.world import init_world  # noqa: E402

init_world(timeout_s=timeout_s, device="cpu")
print("joined", flush=True)
