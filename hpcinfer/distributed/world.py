"""init_world(): who am I (rank, world size, local rank), and one torch.distributed group.

Launchers, in the order we look for them:

- MPI (``mpirun`` / ``srun --mpi=pmix|pmi2``): mpi4py gives rank and size. Every rank checks in
  with rank 0 over MPI point-to-point messages polled against a deadline, so a rank that never
  arrives is *named* (rank and host) within ``timeout_s`` instead of hanging a collective; then
  rank 0 picks the rendezvous address and a free port and sends them to everyone.
- Slurm without MPI (plain ``srun``): ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the
  address is the first host of the step, the port derived from the job id (nothing can be
  broadcast before the store exists). ``MASTER_ADDR``/``MASTER_PORT`` win when set.
- torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``).
- otherwise a single process (world size 1; no process group is created).

The default group is NCCL on CUDA (one GPU per local rank) and gloo on CPU. ``World.cpu_group``
is always a gloo group: Python objects (sampled tokens, commands) travel over it, since NCCL
moves only device tensors.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE",
            "MPI_LOCALNRANKS")
_TAG_CHECKIN, _TAG_ADDRESS = 7101, 7102


class RankMissingError(RuntimeError):
    """A rank did not reach init_world() in time."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    launcher: str                 # "mpi" | "slurm" | "torchrun" | "spawn" | "single"
    backend: str                  # "nccl" | "gloo" | "none"
    device: torch.device
    hosts: tuple[str, ...] = ()   # host of each rank where known (MPI check-in)
    cpu_group: Any = None         # gloo group over all ranks (None at size 1)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def current_world() -> World | None:
    """The World set up by init_world() in this process, if any."""
    return _WORLD


@dataclass(frozen=True)
class Launch:
    rank: int
    size: int
    local_rank: int
    launcher: str


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Rank, size and local rank from the launcher's environment (no communication)."""
    env = os.environ if env is None else env
    if any(k in env for k in _MPI_ENV) and _mpi_available():
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID",
                                                                  env.get("SLURM_LOCALID", 0))))
        return Launch(comm.Get_rank(), comm.Get_size(), local, "mpi")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", 1))) > 1:
        return Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS"))),
                      int(env.get("SLURM_LOCALID", 0)), "slurm")
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      "torchrun")
    return Launch(0, 1, 0, "single")


def _mpi_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def init_world(*, timeout_s: float | None = None, device: str = "auto") -> World:
    """Set up (once per process) and return this process's World; see the module docstring.

    ``timeout_s`` bounds the check-in and the torch rendezvous (default
    ``HPCINFER_DIST_TIMEOUT`` or 120 s).
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    timeout_s = float(timeout_s if timeout_s is not None
                      else os.environ.get("HPCINFER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    launch = detect_launch()
    if launch.size == 1:
        _WORLD = World(0, 1, 0, launch.launcher, "none", _pick_device(device, 0))
        return _WORLD
    if launch.launcher == "mpi":
        addr, port, hosts = _mpi_rendezvous(timeout_s)
    else:
        addr, port, hosts = _env_rendezvous(launch), None, ()
    _WORLD = _init_process_group(launch, addr, port, hosts, timeout_s, device)
    return _WORLD


def init_world_explicit(rank: int, size: int, addr: str, port: int, *, local_rank: int,
                        launcher: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                        device: str = "auto") -> World:
    """Join a group whose address is already agreed (spawned ranks use this)."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    _WORLD = _init_process_group(Launch(rank, size, local_rank, launcher), addr, port, (),
                                 timeout_s, device)
    return _WORLD


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return device


def _init_process_group(launch: Launch, addr: str, port: int | None, hosts: tuple[str, ...],
                        timeout_s: float, device_name: str) -> World:
    device = _pick_device(device_name, launch.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    port = int(port if port is not None else os.environ["MASTER_PORT"])
    if launch.launcher != "spawn":  # a spawning driver stays a single process to later checks
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(launch.rank),
                          WORLD_SIZE=str(launch.size), LOCAL_RANK=str(launch.local_rank))
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=launch.rank,
                                world_size=launch.size, timeout=timeout, **kwargs)
    except Exception as e:  # torch's own message names neither the address nor what to check
        raise RankMissingError(
            f"rank {launch.rank}/{launch.size} on {socket.gethostname()} could not join the "
            f"torch.distributed rendezvous at {addr}:{port} within {timeout_s:.0f} s ({e}); "
            "check that every rank was started, that the port is reachable between the nodes "
            "and that MASTER_ADDR names rank 0's host") from e
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    if backend == "gloo":
        # Tear gloo down before mpi4py finalizes MPI at exit: under `srun --mpi=pmix` the
        # interpreter otherwise aborts at exit ("terminate called without an active exception").
        atexit.register(_destroy_at_exit)
    log.info("rank %d/%d (local %d) joined %s at %s:%d via %s on %s", launch.rank, launch.size,
             launch.local_rank, backend, addr, port, launch.launcher, device)
    return World(launch.rank, launch.size, launch.local_rank, launch.launcher, backend, device,
                 hosts, cpu_group)


# --- MPI: check-in with a deadline, then the address ---
def _mpi_rendezvous(timeout_s: float) -> tuple[str, int, tuple[str, ...]]:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    if rank == 0:
        pending = {r: comm.irecv(source=r, tag=_TAG_CHECKIN) for r in range(1, size)}
        hosts = {0: host}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for r, req in list(pending.items()):
                done, msg = req.test()
                if done:
                    hosts[r] = msg
                    del pending[r]
            time.sleep(0.005)
        if pending:
            _abort(comm, missing_ranks_message(sorted(pending), hosts, size, timeout_s))
        addr = os.environ.get("MASTER_ADDR") or _rendezvous_host(hosts)
        port = int(os.environ.get("MASTER_PORT") or free_port(addr))
        host_list = tuple(hosts[r] for r in range(size))
        for r in range(1, size):
            comm.send((addr, port, host_list), dest=r, tag=_TAG_ADDRESS)
        return addr, port, host_list
    sent = comm.isend(host, dest=0, tag=_TAG_CHECKIN)
    answer = comm.irecv(source=0, tag=_TAG_ADDRESS)
    # Rank 0 waits timeout_s for the others; give it a little longer to report first.
    deadline = time.monotonic() + timeout_s + 10.0
    while time.monotonic() < deadline:
        done, msg = answer.test()
        if done:
            sent.wait()
            return msg
        time.sleep(0.005)
    if rank == 1:  # one message, not one per rank
        _abort(comm, missing_ranks_message([0], {rank: host}, size, timeout_s + 10.0))
    time.sleep(5.0)  # rank 1 aborts the job; the others stay quiet
    comm.Abort(3)
    raise AssertionError("unreachable")


def _abort(comm, message: str) -> None:
    # stderr, not logging: it must reach the job log even where logging is not configured,
    # and exactly once.
    print(f"hpcinfer: error: {message}", file=sys.stderr, flush=True)
    comm.Abort(3)  # the others are blocked in MPI calls; only Abort frees them


def missing_ranks_message(missing: list[int], hosts: dict[int, str], size: int,
                          timeout_s: float) -> str:
    """One line naming the ranks that did not check in, with the host each should be on."""
    parts = [f"rank {r} (host {expected_host(r, size, hosts)})" for r in missing]
    arrived = ", ".join(f"{r}@{h}" for r, h in sorted(hosts.items())) or "none"
    return (f"{'; '.join(parts)} did not reach init_world() within {timeout_s:.0f} s "
            f"(ranks known to be up: {arrived}). The process may be stuck (a slow file system, "
            "an import, a busy GPU) or was never started: look at that rank's output and "
            "node, or raise HPCINFER_DIST_TIMEOUT")


def expected_host(rank: int, size: int, hosts: dict[int, str]) -> str:
    """Where a rank should run: Slurm's step layout, or this host when every rank is local."""
    layout = slurm_rank_hosts()
    if layout and rank < len(layout):
        return layout[rank]
    if int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", 0)) == size and hosts:
        return next(iter(hosts.values()))
    return "unknown: the launcher gives no rank-to-host map"


def slurm_rank_hosts() -> list[str]:
    """Host of each rank of the current Slurm step (block distribution), or []."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not per_node:
        return []
    nodes = expand_hostlist(nodelist)
    counts: list[int] = []
    for item in per_node.split(","):
        n, _, rep = item.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return [node for node, n in zip(nodes, counts) for _ in range(n)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03],cpu1") as names; scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    hosts, depth, item = [], 0, ""
    for ch in nodelist + ",":  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            hosts += _expand_one(item)
            item = ""
        else:
            item += ch
    return hosts


def _expand_one(item: str) -> list[str]:
    if "[" not in item:
        return [item] if item else []
    prefix, _, rest = item.partition("[")
    ranges, _, suffix = rest.partition("]")
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            names.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return names


def _rendezvous_host(hosts: dict[int, str]) -> str:
    # All ranks on one host: loopback (no interface questions). Otherwise rank 0's host, which
    # under Slurm's block distribution is the first host of the allocation.
    if len(set(hosts.values())) == 1:
        return "127.0.0.1"
    return hosts[0]


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on addr right now (bound and released)."""
    bind_addr = addr if addr in ("127.0.0.1", "localhost") else ""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind_addr, 0))
        return s.getsockname()[1]


# --- without MPI: deterministic address, the store's own timeout ---
def _env_rendezvous(launch: Launch) -> str:
    if launch.launcher == "torchrun" or "MASTER_ADDR" in os.environ:
        os.environ.setdefault("MASTER_PORT", "29500")
        return os.environ.get("MASTER_ADDR", "127.0.0.1")
    hosts = slurm_rank_hosts()
    addr = hosts[0] if hosts and len(set(hosts)) > 1 else "127.0.0.1"
    # Nothing can be broadcast yet, so every rank derives the same port from the job id.
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    os.environ.setdefault("MASTER_PORT", str(20000 + (job * 7 + int(
        os.environ.get("SLURM_STEP_ID", "0") or 0)) % 20000))
    return addr


EXTRA_GROUPS: list = []  # gloo subgroups (TP/PP), flushed at exit too


EXIT_SETTLE_S = 0.2  # see _destroy_at_exit


def _destroy_at_exit() -> None:
    # A gloo worker thread drops its last reference to a finished collective's tensors a
    # moment after the caller returns (at the end of its loop, after the caller was woken);
    # if Python is finalizing by then, that decref needs the GIL, the thread is ended with
    # pthread_exit inside a noexcept destructor, and the process aborts ("terminate called
    # without an active exception", exit 134). Barriers on every group let threads that are
    # ready take the GIL now, but do not prove every thread got there: one thread of a
    # group can run both barriers while the other is still descheduled short of its release
    # (seen 1 run in 30 of tests/distributed/prompt_logprobs_spmd.py under `mpirun -n 2` on a
    # 2-core VM, 2026-12-05). The pause, with the GIL released, gives a descheduled thread
    # the time slices it needs. destroy_process_group does not join gloo's threads (they
    # live as long as the group objects the model still references), so nothing else does.
    if not dist.is_initialized():
        return
    spawned = _WORLD is not None and _WORLD.launcher == "spawn"  # its workers already left
    try:
        for group in [] if spawned else [None, *EXTRA_GROUPS]:
            for _ in range(2):
                dist.barrier(group=group)
    except Exception as e:  # a peer already gone: nothing to flush
        log.debug("exit barrier failed: %s", e)
    time.sleep(EXIT_SETTLE_S)
    dist.destroy_process_group()


def destroy_world() -> None:
    """Tear the process group down (tests and clean exits)."""
    global _WORLD
    if _WORLD is not None and _WORLD.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    EXTRA_GROUPS.clear()
    _WORLD = None
