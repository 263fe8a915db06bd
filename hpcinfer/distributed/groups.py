"""Tensor- and pipeline-parallel groups over a World.

Layout: ``rank = pp_rank * tp_size + tp_rank``. A TP group is ``tp_size`` consecutive ranks,
so with one task per GPU and ``tp_size`` dividing the GPUs per node, TP all-reduces stay inside
a node (NVLink) and only PP's activations cross nodes. Every rank must call ``make_groups``
(``new_group`` is collective over the whole world, in the same order everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from hpcinfer.distributed.world import EXTRA_GROUPS, World
from hpcinfer.layers.linear import TensorParallel


@dataclass(frozen=True)
class PipelineStage:
    """This rank's pipeline stage: decoder layers ``[start_layer, end_layer)`` of
    ``num_layers``; ``prev_rank``/``next_rank`` are global ranks (None at the ends)."""
    rank: int = 0
    size: int = 1
    start_layer: int = 0
    end_layer: int = 0
    num_layers: int = 0
    prev_rank: int | None = None
    next_rank: int | None = None
    group: Any = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


@dataclass(frozen=True)
class ParallelGroups:
    world: World
    tp: TensorParallel
    pp_rank: int
    pp_size: int
    pp_group: Any

    @property
    def last_stage_driver(self) -> int:
        """Global rank that holds the logits rank 0 samples from (TP rank 0 of the last stage)."""
        return (self.pp_size - 1) * self.tp.size


def split_layers(num_layers: int, pp_size: int, partition: list[int] | None = None
                 ) -> list[tuple[int, int]]:
    """[start, end) per stage: balanced (earlier stages take the remainder), or as given.

    ``partition`` (e.g. from HPCINFER_PP_PARTITION="12,12,8") lists layers per stage."""
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"pipeline partition {partition} must list {pp_size} positive "
                             f"layer counts summing to the model's {num_layers} layers")
        counts = list(partition)
    else:
        if pp_size > num_layers:
            raise ValueError(f"pipeline_parallel_size={pp_size} is more than the model's "
                             f"{num_layers} layers: use at most {num_layers} stages")
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (i < extra) for i in range(pp_size)]
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def make_groups(world: World, tp_size: int, pp_size: int) -> ParallelGroups:
    """Create the TP and PP groups (collective) and return this rank's place in them."""
    if tp_size * pp_size != world.size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} x pipeline_parallel_size={pp_size} = "
            f"{tp_size * pp_size} ranks, but {world.size} were started ({world.launcher}): "
            f"start {tp_size * pp_size} ranks (mpirun -n / srun -n) or change the sizes")
    tp_rank, pp_rank = world.rank % tp_size, world.rank // tp_size
    tp_group = pp_group = None
    if world.size > 1:
        for p in range(pp_size):  # every rank creates every group, in the same order
            ranks = list(range(p * tp_size, (p + 1) * tp_size))
            g = dist.new_group(ranks) if tp_size > 1 else None
            if p == pp_rank:
                tp_group = g
                if g is not None and world.backend == "gloo":
                    EXTRA_GROUPS.append(g)
        for t in range(tp_size):
            ranks = list(range(t, world.size, tp_size))
            g = dist.new_group(ranks) if pp_size > 1 else None
            if t == tp_rank:
                pp_group = g
                if g is not None and world.backend == "gloo":
                    EXTRA_GROUPS.append(g)
    return ParallelGroups(world, TensorParallel(tp_rank, tp_size, tp_group), pp_rank, pp_size,
                          pp_group)


def pipeline_stage(groups: ParallelGroups, num_layers: int,
                   partition: list[int] | None = None) -> PipelineStage:
    """This rank's stage for a model of ``num_layers`` decoder layers."""
    bounds = split_layers(num_layers, groups.pp_size, partition)
    start, end = bounds[groups.pp_rank]
    tp = groups.tp.size
    rank = groups.world.rank
    return PipelineStage(groups.pp_rank, groups.pp_size, start, end, num_layers,
                         rank - tp if groups.pp_rank > 0 else None,
                         rank + tp if groups.pp_rank < groups.pp_size - 1 else None,
                         groups.pp_group)
