"""Where this worker process stands among the job step's ranks, and its replica's wiring.

The job script's ``srun`` starts ``world = nodes x ranks_per_node`` worker processes. They
form ``world / (tensor x pipeline)`` data-parallel **replicas** of consecutive ranks
(replica ``r`` = ranks ``r*size .. r*size+size-1``, so a replica's TP group stays inside a
node). In each replica, rank 0 is the **driver** (reads input, runs the ShardLoop, writes and
commits output) and the others are **followers** that replay the driver's engine calls
(hpcinfer/distributed/replay.py). Each replica is its own torch.distributed world (its own
rendezvous), so the engine's rank-0-samples logic holds inside every replica unchanged.

Shards are split between replicas by rows, largest first, each to the replica with the
fewest rows so far (``split_shards``): no two replicas share a shard, so the per-shard ledger
keeps exactly-once as with one replica.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger("hpcinfer.worker")


@dataclass(frozen=True)
class RankPlace:
    rank: int              # in the job step (SLURM_PROCID / MPI rank)
    world_size: int
    local_rank: int        # on this node (picks the GPU)
    replica: int
    num_replicas: int
    replica_rank: int      # in the replica: 0 is the driver
    replica_size: int      # tensor x pipeline
    host: str
    launcher: str          # detect_launch(): mpi | slurm | torchrun | single

    @property
    def is_driver(self) -> bool:
        return self.replica_rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} on {self.host}"


class LayoutError(ValueError):
    """The ranks started do not form whole replicas."""


def place_of(rank: int, world_size: int, local_rank: int, replica_size: int,
             launcher: str = "single", host: str | None = None) -> RankPlace:
    if world_size % replica_size:
        raise LayoutError(
            f"{world_size} ranks were started but one replica needs parallel.tensor x "
            f"parallel.pipeline = {replica_size}: start a multiple of {replica_size} ranks "
            "(render the job again, or fix resources.gpus_per_node)")
    replica, replica_rank = divmod(rank, replica_size)
    return RankPlace(rank, world_size, local_rank, replica, world_size // replica_size,
                     replica_rank, replica_size, host or socket.gethostname(), launcher)


def env_rank() -> int:
    """This rank from the launcher's variables, before MPI starts (for log lines)."""
    from hpcinfer.worker.preflight import _RANK_VARS, _first_env
    return int(_first_env(_RANK_VARS, "0"))


def detect_place(tensor: int, pipeline: int) -> RankPlace:
    """This process's place from the launcher (initializes MPI under srun --mpi/mpirun)."""
    from hpcinfer.distributed.world import detect_launch
    launch = detect_launch()
    if launch.size == 1:   # run --local, or a bare `python -m hpcinfer.worker`: the driver
        return place_of(0, 1, 0, 1, launch.launcher)   # spawns its other ranks (spawn.py)
    return place_of(launch.rank, launch.size, launch.local_rank, tensor * pipeline,
                    launch.launcher)


def split_shards(shards, num_replicas: int) -> list[tuple]:
    """Shards of each replica: largest first to the replica with the fewest rows (ties: the
    lowest replica), each replica's list back in shard order. Deterministic on every rank."""
    loads = [0] * num_replicas
    picked: list[list] = [[] for _ in range(num_replicas)]
    for shard in sorted(shards, key=lambda s: (-s.num_rows, s.index)):
        r = min(range(num_replicas), key=lambda i: (loads[i], i))
        picked[r].append(shard)
        loads[r] += shard.num_rows
    return [tuple(sorted(p, key=lambda s: s.index)) for p in picked]


class Replica:
    """This rank's replica once joined: its torch world (None for a one-rank replica) and
    the lifeline between its driver and followers."""

    def __init__(self, place: RankPlace, world=None, lifeline=None):
        self.place = place
        self.world = world
        self.lifeline = lifeline

    @property
    def group(self):
        return None if self.world is None else self.world.cpu_group

    def announce(self, decision: dict) -> dict:
        """Driver: send ``decision`` to the followers; follower: receive the driver's."""
        if self.world is None:
            return decision
        import torch.distributed as dist
        box = [decision if self.place.is_driver else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def join(place: RankPlace, device: str, timeout_s: float | None = None) -> Replica:
    """Start this replica's torch world and lifelines (collective over the replica)."""
    if place.replica_size == 1:
        return Replica(place)
    from hpcinfer.distributed import world as worlds
    timeout_s = float(timeout_s if timeout_s is not None
                      else os.environ.get("HPCINFER_DIST_TIMEOUT", worlds.DEFAULT_TIMEOUT_S))
    if place.num_replicas == 1:
        world = worlds.init_world(timeout_s=timeout_s, device=device)   # MPI check-in names a lost rank
    else:
        addr, port = _replica_rendezvous(place)
        world = worlds.init_world_explicit(place.replica_rank, place.replica_size, addr, port,
                                    local_rank=place.local_rank, launcher=place.launcher,
                                    timeout_s=timeout_s, device=device)
    return Replica(place, world, _lifeline(place, world, timeout_s))


def _lifeline(place: RankPlace, world, timeout_s: float):
    import torch.distributed as dist

    from hpcinfer.worker.lifeline import Lifeline
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")   # reachable from every rank of it
    if place.is_driver:
        def publish(address):
            dist.broadcast_object_list([(address, place.host, os.getpid())], src=0,
                                       group=world.cpu_group)
        return Lifeline.serve(place.label, place.replica, addr, place.replica_size - 1,
                              publish, timeout_s)
    box = [None]
    dist.broadcast_object_list(box, src=0, group=world.cpu_group)
    address, driver_host, driver_pid = box[0]
    return Lifeline.connect(place.label, place.replica, tuple(address), place.rank,
                            (place.rank - place.replica_rank, driver_host, driver_pid), timeout_s)


def _replica_rendezvous(place: RankPlace) -> tuple[str, int]:
    """(address, port) of this replica's own torch world: its driver's host and a port it
    picked (MPI), or the step's first host of the replica and a port derived from the job id
    (plain srun: nothing can be exchanged before a store exists)."""
    from hpcinfer.distributed.world import free_port, slurm_rank_hosts
    if place.launcher == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD.Split(color=place.replica, key=place.rank)
        hosts = comm.allgather(place.host)
        addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
        return comm.bcast((addr, free_port(addr)) if place.is_driver else None, root=0)
    hosts = slurm_rank_hosts()
    first = place.replica * place.replica_size
    mine = hosts[first:first + place.replica_size]
    addr = mine[0] if mine and len(set(hosts)) > 1 else "127.0.0.1"
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    step = int(os.environ.get("SLURM_STEP_ID", "0") or 0)
    base = int(os.environ.get("MASTER_PORT") or 20000 + (job * 7 + step) % 20000)
    return addr, 1024 + (base - 1024 + 1 + place.replica) % (65535 - 1024)


def device_of(place: RankPlace, cfg) -> str | None:
    """The device of a one-rank replica on GPU when several share a node: GPU local_rank
    (a multi-rank replica's world picks it itself). None: resources.device as it is."""
    if str(cfg.resources.device) != "cuda" or place.replica_size != 1 or place.world_size == 1:
        return None
    import torch
    return f"cuda:{place.local_rank % max(torch.cuda.device_count(), 1)}"
