"""Pipeline parallelism on the model side: keep only this stage's layers.

``prune_to_stage(model, stage)`` runs on the meta-device model, before any memory is
allocated: decoder layers outside ``[start_layer, end_layer)`` become ``MissingLayer`` (no
parameters), an untied embedding leaves every stage but the first and an untied LM head every
stage but the last. The model's layer container gets ``start_layer``/``end_layer`` (its
forward runs only those layers and, except on the last stage, returns the intermediate
tensors), and ``model.pp_owns_tensor(name)`` tells the loader which checkpoint tensors to read.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from hpcinfer.distributed.groups import PipelineStage


class MissingLayer(nn.Module):
    """A layer that lives on another pipeline stage."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer belongs to another pipeline stage")


def layer_container(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the module that holds the decoder ``layers`` ModuleList."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return name, module
    raise ValueError(f"{type(model).__name__} has no decoder `layers` list: pipeline "
                     "parallelism does not support it")


def prune_to_stage(model: nn.Module, stage: PipelineStage) -> None:
    name, container = layer_container(model)
    prefix = f"{name}." if name else ""
    pruned: list[str] = []
    for i in range(len(container.layers)):
        if not stage.start_layer <= i < stage.end_layer:
            container.layers[i] = MissingLayer()
            pruned.append(f"{prefix}layers.{i}")
    container.start_layer, container.end_layer = stage.start_layer, stage.end_layer
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not tied:  # a tied head needs the embedding's weight on the last stage too
        if not stage.is_first:
            container.embed_tokens = MissingLayer()
            pruned.append(f"{prefix}embed_tokens")
        if not stage.is_last:
            model.lm_head = MissingLayer()
            pruned.append("lm_head")
    prefixes = tuple(p + "." for p in pruned)
    model.pp_owns_tensor = lambda tensor_name: not tensor_name.startswith(prefixes)
    model.pp_stage = stage


def stage_spec(spec, stage: PipelineStage):
    """The ModelSpec of one stage: ``num_layers`` is the layers this rank holds KV for."""
    return dataclasses.replace(spec, num_layers=stage.end_layer - stage.start_layer)


# --- micro-batches: how one scheduled step is cut for the pipeline -----------------------
#
# With S stages and one batch per step, S-1 of every S stage-slots idle (stage s waits for
# s-1). Cutting the step's batch into M micro-batches lets stage s run micro-batch m while
# stage s+1 runs m-1: the idle share ("bubble") falls to (S-1)/(M+S-1). A micro-batch must
# still be big enough to keep the GPU compute-bound, since each one re-reads the stage's
# weights: below ~256 tokens (about an H100/H200's bf16 FLOP-to-byte ratio) a decode
# micro-batch costs nearly as much as the whole batch would. docs/multi-node.md has the numbers.

MIN_MICRO_BATCH_TOKENS = 256
MICRO_BATCHES_ENV = "HPCINFER_PP_MICRO_BATCHES"


def micro_batches_setting(configured: int | None, environ=None) -> int | None:
    """The user's micro-batch count: the engine argument, else $HPCINFER_PP_MICRO_BATCHES,
    else None (automatic, see ``num_micro_batches``)."""
    if configured is not None:
        return configured
    import os
    raw = (os.environ if environ is None else environ).get(MICRO_BATCHES_ENV, "").strip()
    if not raw or raw == "auto":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MICRO_BATCHES_ENV}={raw!r} must be an integer >= 1 or 'auto': the "
                         "number of micro-batches each pipeline step is cut into")
    return int(raw)


def num_micro_batches(setting: int | None, num_stages: int, num_seqs: int,
                      num_tokens: int) -> int:
    """Micro-batches for one step: ``setting`` if given, else as many as there are stages
    while each keeps >= MIN_MICRO_BATCH_TOKENS tokens; never more than the sequences (a
    sequence is never split: its attention needs all its query rows in one micro-batch)."""
    if num_stages == 1:
        return 1
    wanted = setting if setting is not None else min(num_stages,
                                                     num_tokens // MIN_MICRO_BATCH_TOKENS)
    return max(1, min(wanted, num_seqs))


def micro_batch_bounds(q_lens: list[int], num_micro: int) -> list[tuple[int, int]]:
    """Cut sequences ``0..len(q_lens)`` into ``num_micro`` contiguous non-empty ranges
    ``[a, b)`` of about equal token counts (q_lens: query tokens per sequence this step).

    Contiguous ranges keep the step's order, so the sampled rows of all micro-batches,
    concatenated, are the step's sampled rows in the engine's order."""
    num_seqs = len(q_lens)
    num_micro = max(1, min(num_micro, num_seqs))
    total = sum(q_lens)
    bounds, start, seen = [], 0, 0
    for i, q in enumerate(q_lens):
        seen += q
        left_micro = num_micro - len(bounds) - 1    # ranges still to open after this one
        left_seqs = num_seqs - i - 1
        if left_micro == 0:
            break
        # close here when this range reached its share of tokens, or when every remaining
        # sequence is needed to give each remaining range one
        if seen * num_micro >= total * (len(bounds) + 1) or left_seqs == left_micro:
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, num_seqs))
    return bounds


class PipelineTrace:
    """``HPCINFER_PP_TRACE=DIR``: each rank appends its micro-batch events to
    ``DIR/rank<R>.jsonl`` ({"step", "event", "micro"}; events "start", "end" and
    "next_started_0").

    To make overlap an *order* fact rather than a timing one, a traced stage waits, before its
    last micro-batch, until the next stage reports (over the gloo group) that it has started
    micro-batch 0 of the same step, and logs "next_started_0" when it has. A pipeline that
    ran its stages one after the other could never get there: the wait fails after
    ``timeout_s`` with a message saying so."""

    NOTICE_TAG = 7201

    def __init__(self, directory: str, stage: PipelineStage, world, timeout_s: float = 120.0):
        import os
        self.stage, self.world, self.timeout_s = stage, world, timeout_s
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"rank{world.rank}.jsonl")
        self.pending: list = []   # notices sent, waited on at the end of the step

    def record(self, step: int, event: str, micro: int) -> None:
        import json
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "event": event, "micro": micro}) + "\n")

    def before_start(self, step: int, micro: int, num_micro: int) -> None:
        if micro != num_micro - 1 or num_micro < 2 or self.stage.is_last:
            return
        import datetime

        import torch
        import torch.distributed as dist
        notice = torch.zeros(1, dtype=torch.int64)
        work = dist.irecv(notice, src=self.stage.next_rank, group=self.world.cpu_group,
                          tag=self.NOTICE_TAG)
        try:  # (gloo's receive reports completion only through wait)
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise RuntimeError(
                f"pipeline trace, step {step}: stage {self.stage.rank + 1} did not start "
                f"micro-batch 0 while stage {self.stage.rank} still had micro-batch {micro} "
                f"to run: the stages do not overlap ({e})") from e
        if int(notice.item()) != step:
            raise RuntimeError(f"pipeline trace: notice for step {int(notice.item())} "
                               f"arrived in step {step}")
        self.record(step, "next_started_0", micro)

    def started(self, step: int, micro: int, num_micro: int) -> None:
        self.record(step, "start", micro)
        if micro == 0 and num_micro > 1 and not self.stage.is_first:
            import torch
            import torch.distributed as dist
            notice = torch.tensor([step], dtype=torch.int64)
            self.pending.append((notice, dist.isend(notice, dst=self.stage.prev_rank,
                                                    group=self.world.cpu_group,
                                                    tag=self.NOTICE_TAG)))

    def end_step(self) -> None:
        for _, work in self.pending:
            work.wait()
        self.pending.clear()
