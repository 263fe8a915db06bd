"""One process asking for ``LLM(..., tensor_parallel_size=N)`` starts its other N-1 ranks.

The caller becomes rank 0 (the driver). Ranks 1..N-1 are fresh interpreters
(``python -m hpcinfer.distributed.spawn``, i.e. spawned, never forked: no copied CUDA or thread
state, and unlike ``multiprocessing``'s spawn they do not re-import the user's script, which
in the vLLM examples has no ``if __name__ == "__main__"`` guard). They join the same process
group (NCCL on GPU, gloo on CPU), build the same LLMEngine and replay the driver's calls.
The driver's calls are replayed on them with the protocol of ``replay.py`` (one broadcast
per step), so every rank's scheduler sees the same inputs at the same step (SPMD) and rank 0
alone samples (distributed_runner.DistributedSampler).

A child exits when told to, when its parent dies (a watchdog polls the parent pid), or on an
error (logged with its rank; the driver then fails in the next collective within the timeout).
"""
from __future__ import annotations

import atexit
import base64
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref

from hpcinfer.distributed.replay import CommandChannel, DriverEngine, follow
from hpcinfer.distributed.world import DEFAULT_TIMEOUT_S, free_port, init_world_explicit

log = logging.getLogger(__name__)


def start_workers(config, num_ranks: int) -> list:
    """Spawn ranks 1..num_ranks-1 and make this process rank 0 of a new world."""
    addr, port = "127.0.0.1", free_port()
    timeout_s = float(os.environ.get("HPCINFER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    payload = base64.b64encode(pickle.dumps(config)).decode()
    procs = [subprocess.Popen([sys.executable, "-m", "hpcinfer.distributed.spawn", str(rank),
                               str(num_ranks), addr, str(port), str(timeout_s), str(os.getpid())],
                              env={**os.environ, "HPCINFER_SPAWN_CONFIG": payload})
             for rank in range(1, num_ranks)]
    init_world_explicit(0, num_ranks, addr, port, local_rank=0, launcher="spawn",
                        timeout_s=timeout_s, device=config.device)
    log.info("spawned %d worker ranks (pids %s)", len(procs), [p.pid for p in procs])
    return procs


class SpawnedRanks:
    """The ranks this process spawned and the channel that drives them (replay.py)."""

    def __init__(self, world, procs: list):
        self.channel = CommandChannel(world.cpu_group)
        self.procs = procs
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.stop(0)
        except Exception as e:  # noqa: BLE001 - a worker already gone: nothing to stop
            log.warning("could not tell the worker ranks to stop: %s", e)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


_ACTIVE: list[SpawnedRanks] = []  # the ranks this process spawned last


class _SpawnDriverEngine(DriverEngine):
    def __init__(self, config, ranks: SpawnedRanks):
        self.ranks = ranks
        super().__init__(config, ranks.channel)

    def shutdown(self) -> None:
        self.ranks.close()


def make_driver_engine(config):
    """An LLMEngine (rank 0) whose calls are mirrored to spawned worker ranks.

    One spawned engine at a time per process: a new one stops the previous one's ranks and
    leaves its process group first (the old LLM object cannot be used after that)."""
    from hpcinfer.distributed.world import current_world, destroy_world

    while _ACTIVE:
        _ACTIVE.pop().close()
        destroy_world()
    num_ranks = config.tensor_parallel_size * config.pipeline_parallel_size
    procs = start_workers(config, num_ranks)
    ranks = SpawnedRanks(current_world(), procs)
    try:
        engine = _SpawnDriverEngine(config, ranks)
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    atexit.register(ranks.close)
    _ACTIVE.append(ranks)
    weakref.finalize(engine, ranks.close)
    return engine


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the driver is gone: nobody will ever send us a command
        time.sleep(1.0)


def _worker_main(rank: int, num_ranks: int, addr: str, port: int, config, timeout_s: float,
                 parent_pid: int) -> None:
    logging.basicConfig(level=os.environ.get("HPCINFER_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s rank{rank} %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        world = init_world_explicit(rank, num_ranks, addr, port, local_rank=rank,
                                    launcher="spawn", timeout_s=timeout_s, device=config.device)
        from hpcinfer.engine.llm_engine import LLMEngine
        code = follow(LLMEngine(config), world.cpu_group)
        # No destroy_process_group: NCCL's teardown waits on peers that are already leaving
        # (30 s at exit, measured on 2 H200s); just go.
        logging.shutdown()
        os._exit(code)
    except Exception:
        log.exception("worker rank %d failed", rank)
        os._exit(1)


if __name__ == "__main__":
    _rank, _n, _addr, _port, _timeout, _parent = sys.argv[1:7]
    _config = pickle.loads(base64.b64decode(os.environ.pop("HPCINFER_SPAWN_CONFIG")))
    _worker_main(int(_rank), int(_n), _addr, int(_port), _config, float(_timeout), int(_parent))
