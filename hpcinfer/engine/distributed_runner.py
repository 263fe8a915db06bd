"""The engine across ranks (tensor and pipeline parallelism), SPMD.

Every rank runs the same LLMEngine: same scheduler, same inputs, same KV block count (the
minimum over ranks), so every step schedules the same batch everywhere. What differs:

- ``DistributedRunner.run``: a pipeline stage after the first receives (hidden[, residual])
  [T, hidden] from the previous stage, runs its layers and sends them on; the last stage
  computes the logits and its TP rank 0 sends them to global rank 0. One batch is in flight
  at a time (no micro-batching yet: stages wait for each other).
- ``DistributedSampler``: global rank 0 samples (so seeded sampling does not depend on the
  rank layout) and broadcasts the SamplerOutput over the gloo group; every rank appends the
  same tokens.

``setup_parallel(config)`` is the engine's only hook: None for one process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpcinfer.distributed.groups import ParallelGroups, PipelineStage, make_groups, pipeline_stage
from hpcinfer.distributed.world import detect_launch, init_world
from hpcinfer.engine.model_runner import Batch, ModelRunner

log = logging.getLogger(__name__)


@dataclass
class EngineParallel:
    groups: ParallelGroups
    stage: PipelineStage

    @property
    def device(self) -> torch.device:
        return self.groups.world.device

    @property
    def rank(self) -> int:
        return self.groups.world.rank

    def load_kwargs(self) -> dict:
        return {"tp": self.groups.tp, "pp": self.stage}

    def runner(self, config, model, device) -> DistributedRunner:
        return DistributedRunner(config, model, device, self)

    def sampler(self, sampler) -> DistributedSampler:
        return DistributedSampler(sampler, self.groups.world)


def setup_parallel(config) -> EngineParallel | None:
    """Join (or start) the world and build this rank's groups; None for a single process."""
    tp, pp = config.tensor_parallel_size, getattr(config, "pipeline_parallel_size", 1)
    if tp * pp == 1:
        if detect_launch().size > 1:
            log.warning("started as %d ranks with tensor_parallel_size=1 and "
                        "pipeline_parallel_size=1: every rank runs its own full engine",
                        detect_launch().size)
        return None
    world = init_world(device=config.device)
    groups = make_groups(world, tp, pp)
    from hpcinfer.models.registry import load_config
    num_layers = load_config(config.model).num_hidden_layers
    partition = os.environ.get("HPCINFER_PP_PARTITION")
    stage = pipeline_stage(groups, num_layers,
                           [int(x) for x in partition.split(",")] if partition else None)
    log.info("rank %d: tp rank %d/%d, pp stage %d/%d (layers %d-%d)", world.rank,
             groups.tp.rank, tp, stage.rank, pp, stage.start_layer, stage.end_layer - 1)
    return EngineParallel(groups, stage)


class DistributedRunner(ModelRunner):
    def __init__(self, config, model, device: torch.device, parallel: EngineParallel):
        super().__init__(config, model, device)
        self.parallel = parallel
        self.num_intermediates = getattr(_layer_owner(model), "pp_num_intermediates", 1)

    def _kv_budget_bytes(self, max_model_len: int) -> int:
        # Every rank must hold the same number of blocks, or the schedulers would diverge.
        per_block = self.bytes_per_block()
        blocks = torch.tensor([super()._kv_budget_bytes(max_model_len) // per_block])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.parallel.groups.world.cpu_group)
        return int(blocks.item()) * per_block

    def capture_cuda_graphs(self) -> None:
        # Not yet validated with collectives inside a graph: run eagerly.
        return None

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Forward this stage; return float32 logits [num_sampled, vocab] on global rank 0
        and on the last stage (an empty tensor of that shape elsewhere)."""
        stage, spec = self.parallel.stage, self.spec
        world = self.parallel.groups.world
        num_tokens = batch.input_ids.shape[0]
        if world.launcher != "spawn":  # spawned ranks replay rank 0's calls: cannot diverge
            self._check_same_batch(batch, world)
        intermediate = None
        if not stage.is_first:
            intermediate = tuple(torch.empty((num_tokens, spec.hidden_size), dtype=spec.dtype,
                                             device=self.device)
                                 for _ in range(self.num_intermediates))
            for t in intermediate:
                dist.recv(t, src=stage.prev_rank)
        if stage.size > 1:
            out = self.model.forward(batch.input_ids, batch.positions, self.kv_caches,
                                     batch.meta, intermediate)
        else:
            out = self.model.forward(batch.input_ids, batch.positions, self.kv_caches,
                                     batch.meta)
        num_sampled = len(batch.sample_seqs)
        if not stage.is_last:
            for t in out:
                dist.send(t.contiguous(), dst=stage.next_rank)
            logits = torch.empty((num_sampled, spec.vocab_size), dtype=torch.float32,
                                 device=self.device)
        elif num_sampled:
            logits = self.model.compute_logits(out[batch.sample_indices]).float()
        else:
            logits = out.new_empty((0, spec.vocab_size), dtype=torch.float32)
        if stage.size > 1 and num_sampled:
            source = self.parallel.groups.last_stage_driver
            if world.rank == source:
                dist.send(logits.contiguous(), dst=0)
            elif world.rank == 0:
                dist.recv(logits, src=source)
        return logits


    def _check_same_batch(self, batch: Batch, world) -> None:
        # Under mpirun/srun every rank feeds its own LLM: a rank given other prompts (or in
        # another order) would schedule another batch and hang in the next collective.
        mine = torch.tensor([batch.input_ids.shape[0], len(batch.sample_seqs),
                             int(batch.input_ids.sum()) % (1 << 31)], dtype=torch.int64)
        ref = mine.clone()
        dist.broadcast(ref, src=0, group=world.cpu_group)
        if not torch.equal(mine, ref):
            raise RuntimeError(
                f"rank {world.rank}'s engine scheduled another batch than rank 0's ({mine.tolist()} "
                f"vs {ref.tolist()} tokens/sampled/id-sum): under mpirun/srun every rank must "
                "give LLM the same prompts, sampling params and calls in the same order")


def _layer_owner(model):
    from hpcinfer.distributed.pipeline import layer_container
    return layer_container(model)[1]


class DistributedSampler:
    """Rank 0 samples; everyone gets its SamplerOutput."""

    def __init__(self, sampler, world):
        self.sampler, self.world = sampler, world

    def __getattr__(self, name):  # make_generator, vocab_size, device, generator
        return getattr(self.sampler, name)

    def __call__(self, logits: torch.Tensor, seqs, eos_token_ids):
        box = [self.sampler(logits, seqs, eos_token_ids) if self.world.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.world.cpu_group)
        return box[0]


def create_engine(config):
    """LLM's engine: spawned worker ranks when one process asks for several ranks."""
    from hpcinfer.distributed.world import current_world
    from hpcinfer.engine.llm_engine import LLMEngine
    ranks = config.tensor_parallel_size * getattr(config, "pipeline_parallel_size", 1)
    if ranks > 1:
        check_layout(config)  # before any rank is started
    world = current_world()
    spawned_before = world is not None and world.launcher == "spawn"
    if ranks > 1 and (spawned_before or (world is None and detect_launch().size == 1)):
        from hpcinfer.distributed.spawn import make_driver_engine
        return make_driver_engine(config)
    return LLMEngine(config)


def check_layout(config) -> None:
    """ValueError, before any rank starts, when the model cannot be split this way."""
    from hpcinfer.distributed.layout import layout_problem
    from hpcinfer.models.registry import load_config
    hf = load_config(config.model)
    problem = layout_problem(hf.num_attention_heads, getattr(hf, "num_key_value_heads", None),
                             hf.num_hidden_layers, config.tensor_parallel_size,
                             getattr(config, "pipeline_parallel_size", 1))
    if problem is not None:
        raise ValueError(problem[1])
