"""Driver/follower replay: one rank (the driver) makes the engine calls, the others replay them.

Every rank of a TP/PP group runs the same LLMEngine (SPMD, distributed_runner.py), so every
rank's scheduler must see the same ``add_request``/``abort_request`` calls in the same order
before each ``step``. Only the driver reads prompts and writes results; it queues its
add/abort calls and sends them, with the ``step``, in **one broadcast per step** over the gloo
``cpu_group``. Followers sit in ``follow()``: receive a message, replay it, repeat.

Message (a list of ops, broadcast from the group's rank 0)::

    [("add", request_id, prompt, params, lora_request), ("abort", request_ids), ..., FINAL]
    FINAL = ("step", final_only) | ("stop", exit_code)

``("stop", code)`` ends ``follow()``, which returns ``code``: the driver alone decides when
and how every rank stops (its stop flag, its exit code), so all ranks stop at the same step
boundary. Users: ``spawn.py`` (one process spawning its other ranks) and the batch worker
(``hpcinfer/worker/ranks.py``, ranks started by srun/mpirun).
"""
from __future__ import annotations

import logging

import torch.distributed as dist

from hpcinfer.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


class CommandChannel:
    """The driver's queue of engine calls, flushed to the followers with each step."""

    def __init__(self, group):
        self.group = group           # gloo group over the driver (rank 0) and its followers
        self.pending: list[tuple] = []
        self.stopped = False

    def queue(self, *op) -> None:
        self.pending.append(op)

    def flush(self, *final_op) -> None:
        ops, self.pending = self.pending + [final_op], []
        dist.broadcast_object_list([ops], src=0, group=self.group)

    def stop(self, exit_code: int = 0) -> None:
        """Tell every follower to leave ``follow()`` with ``exit_code`` (once)."""
        if self.stopped:
            return
        self.stopped = True
        self.flush("stop", int(exit_code))


class DriverEngine(LLMEngine):
    """An LLMEngine whose add/abort/step calls are replayed by the followers.

    ``add_request`` validates first (a bad request raises ValueError here and is never sent),
    so followers only ever replay calls that succeeded on the driver."""

    def __init__(self, config, channel: CommandChannel, tokenizer=None):
        self.channel = channel
        super().__init__(config, tokenizer)

    def add_request(self, request_id, prompt, params=None, lora_request=None, **_vllm_only):
        super().add_request(request_id, prompt, params, lora_request=lora_request)
        self.channel.queue("add", request_id, prompt, params, lora_request)

    def abort_request(self, request_id):
        self.channel.queue("abort", request_id)
        super().abort_request(request_id)

    def step(self, final_only: bool = False):
        self.channel.flush("step", final_only)
        return super().step(final_only)


def follow(engine: LLMEngine, group) -> int:
    """Replay the driver's calls on ``engine`` until it says stop; returns its exit code."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        for op in box[0]:
            kind = op[0]
            if kind == "add":  # (request_id, prompt, params, lora_request)
                engine.add_request(*op[1:4], lora_request=op[4])
            elif kind == "abort":
                engine.abort_request(op[1])
            elif kind == "step":
                engine.step(op[1])
            elif kind == "stop":
                return int(op[1]) if len(op) > 1 else 0
            else:
                raise RuntimeError(f"unknown replay op {kind!r} from the driver (a version "
                                   "mismatch between ranks? every rank must run the same "
                                   "hpcinfer)")
