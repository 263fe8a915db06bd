"""One process asking for ``LLM(..., tensor_parallel_size=N)`` starts its other N-1 ranks.

The caller becomes rank 0 (the driver). Ranks 1..N-1 are fresh interpreters
(``python -m hpcinfer.distributed.spawn``, i.e. spawned, never forked: no copied CUDA or thread
state, and unlike ``multiprocessing``'s spawn they do not re-import the user's script, which
in the vLLM examples has no ``if __name__ == "__main__"`` guard). They join the same process
group (NCCL on GPU, gloo on CPU), build the same LLMEngine and replay the driver's calls.
The driver queues its ``add_request``/``abort_request`` calls and sends them, with the
``step``, in one broadcast per step; so every rank's scheduler sees the same inputs at the same
step (SPMD) and rank 0 alone samples (distributed_runner.DistributedSampler).

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

import torch.distributed as dist

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


class CommandChannel:
    """The driver's queue of engine calls, flushed to the other ranks with each step."""

    def __init__(self, world, procs: list):
        self.world, self.procs = world, procs
        self.pending: list[tuple] = []
        self.closed = False

    def queue(self, *op) -> None:
        self.pending.append(op)

    def flush(self, *final_op) -> None:
        ops, self.pending = self.pending + [final_op], []
        dist.broadcast_object_list([ops], src=0, group=self.world.cpu_group)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.flush("stop")
        except Exception as e:  # a worker already gone: nothing left to stop cleanly
            log.warning("could not tell the worker ranks to stop: %s", e)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


_ACTIVE: list[CommandChannel] = []  # the ranks this process spawned last


def make_driver_engine(config):
    """An LLMEngine (rank 0) whose calls are mirrored to spawned worker ranks.

    One spawned engine at a time per process: a new one stops the previous one's ranks and
    leaves its process group first (the old LLM object cannot be used after that)."""
    from hpcinfer.distributed.world import destroy_world
    from hpcinfer.engine.llm_engine import LLMEngine

    while _ACTIVE:
        _ACTIVE.pop().close()
        destroy_world()
    num_ranks = config.tensor_parallel_size * config.pipeline_parallel_size
    procs = start_workers(config, num_ranks)
    from hpcinfer.distributed.world import current_world
    channel = CommandChannel(current_world(), procs)

    class DriverEngine(LLMEngine):
        def add_request(self, request_id, prompt, params=None):
            super().add_request(request_id, prompt, params)  # validates first: only good ones go
            channel.queue("add", request_id, prompt, params)

        def abort_request(self, request_id):
            channel.queue("abort", request_id)
            super().abort_request(request_id)

        def step(self, final_only: bool = False):
            channel.flush("step", final_only)
            return super().step(final_only)

        def shutdown(self) -> None:
            channel.close()

    try:
        engine = DriverEngine(config)
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    atexit.register(channel.close)
    _ACTIVE.append(channel)
    weakref.finalize(engine, channel.close)
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
        engine = LLMEngine(config)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=world.cpu_group)
            for op in box[0]:
                if op[0] == "add":
                    engine.add_request(*op[1:])
                elif op[0] == "abort":
                    engine.abort_request(op[1])
                elif op[0] == "step":
                    engine.step(op[1])
                elif op[0] == "stop":
                    # No destroy_process_group: NCCL's teardown waits on peers that are
                    # already leaving (30 s at exit, measured on 2 H200s); just go.
                    logging.shutdown()
                    os._exit(0)
    except Exception:
        log.exception("worker rank %d failed", rank)
        os._exit(1)


if __name__ == "__main__":
    _rank, _n, _addr, _port, _timeout, _parent = sys.argv[1:7]
    _config = pickle.loads(base64.b64decode(os.environ.pop("HPCINFER_SPAWN_CONFIG")))
    _worker_main(int(_rank), int(_n), _addr, int(_port), _config, float(_timeout), int(_parent))
