"""The engine across ranks (tensor and pipeline parallelism), SPMD.

Every rank runs the same LLMEngine: same scheduler, same inputs, same KV block count (the
minimum over ranks), so every step schedules the same batch everywhere. What differs:

- ``DistributedRunner.run``: with pipeline stages, the step's batch is cut into micro-batches
  (whole sequences, ``hpcinfer.distributed.pipeline.num_micro_batches``); a stage sends each
  micro-batch's (hidden[, residual]) [T_m, hidden] on with a non-blocking send and goes on
  with the next one, so stage s runs micro-batch m while stage s+1 runs m-1. The last stage
  computes each micro-batch's logits and its TP rank 0 sends them to global rank 0, which
  samples once all have arrived.
- ``DistributedSampler``: global rank 0 samples (so seeded sampling does not depend on the
  rank layout) and broadcasts the SamplerOutput over the gloo group; every rank appends the
  same tokens.

``setup_parallel(config)`` is the engine's only hook: None for one process, unless
``HPCINFER_FORCE_DISTRIBUTED=1`` asks for this path in a world of one (NCCL on a GPU, gloo on
CPU; docs/multi-node.md).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hpcinfer.distributed.groups import (
    ParallelGroups,
    PipelineStage,
    make_groups,
    pipeline_stage,
)
from hpcinfer.distributed.pipeline import (
    PipelineTrace,
    micro_batch_bounds,
    micro_batches_setting,
    num_micro_batches,
)
from hpcinfer.distributed.world import (
    detect_launch,
    free_port,
    init_world,
    init_world_explicit,
)
from hpcinfer.engine.model_runner import Batch, ModelRunner
from hpcinfer.engine.prompt_logprobs import reduce_rows

log = logging.getLogger(__name__)

FORCE_ENV = "HPCINFER_FORCE_DISTRIBUTED"   # "1": the distributed path even for one rank
_LOGITS_TAG = 1 << 20                      # p2p tags: hidden states use 0.., logits this on
_PROMPT_LOGPROBS_TAG = _LOGITS_TAG - 1     # a step's prompt-logprob result (one tensor)


@dataclass
class EngineParallel:
    groups: ParallelGroups
    stage: PipelineStage
    micro_batches: int | None = None   # per pipelined step; None: automatic

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
    forced = os.environ.get(FORCE_ENV, "") == "1"
    if tp * pp == 1 and not forced:
        if detect_launch().size > 1:
            log.warning("started as %d ranks with tensor_parallel_size=1 and "
                        "pipeline_parallel_size=1: every rank runs its own full engine",
                        detect_launch().size)
        return None
    if tp * pp == 1 and detect_launch().size == 1:
        # A world of one with a real process group (NCCL on a GPU): the distributed code
        # path on a single device. init_world() would make no group for one process.
        world = init_world_explicit(0, 1, "127.0.0.1", free_port(), local_rank=0,
                                    launcher="single", device=config.device)
    else:
        world = init_world(device=config.device)
    groups = make_groups(world, tp, pp)
    from hpcinfer.models.registry import load_config
    num_layers = load_config(config.model).num_hidden_layers
    partition = os.environ.get("HPCINFER_PP_PARTITION")
    stage = pipeline_stage(groups, num_layers,
                           [int(x) for x in partition.split(",")] if partition else None)
    micro = micro_batches_setting(getattr(config, "pipeline_micro_batches", None))
    log.info("rank %d: tp rank %d/%d, pp stage %d/%d (layers %d-%d), micro-batches %s", world.rank,
             groups.tp.rank, tp, stage.rank, pp, stage.start_layer, stage.end_layer - 1,
             micro if micro is not None else "auto")
    return EngineParallel(groups, stage, micro)


@dataclass
class PipelinedBatch(Batch):
    """A step's batch plus its micro-batches (contiguous runs of whole sequences)."""
    micro: list[Batch] = field(default_factory=list)


class DistributedRunner(ModelRunner):
    def __init__(self, config, model, device: torch.device, parallel: EngineParallel):
        super().__init__(config, model, device)
        self.parallel = parallel
        self.num_intermediates = getattr(_layer_owner(model), "pp_num_intermediates", 1)
        self.num_steps = 0
        trace_dir = os.environ.get("HPCINFER_PP_TRACE")
        self.trace = (PipelineTrace(trace_dir, parallel.stage, parallel.groups.world,
                                    float(os.environ.get("HPCINFER_DIST_TIMEOUT", "120")))
                      if trace_dir and parallel.stage.size > 1 else None)

    def _kv_budget_bytes(self, max_model_len: int) -> int:
        # Every rank must hold the same number of blocks, or the schedulers would diverge.
        per_block = self.bytes_per_block()
        blocks = torch.tensor([super()._kv_budget_bytes(max_model_len) // per_block])
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.parallel.groups.world.cpu_group)
        return int(blocks.item()) * per_block

    def capture_cuda_graphs(self) -> None:
        # Collectives and stage hand-offs inside a captured graph are not validated yet:
        # graphs only where this rank's forward has none (a world of one).
        if self.parallel.groups.tp.size == 1 and self.parallel.stage.size == 1:
            super().capture_cuda_graphs()

    def graph_logits_fn(self):
        # The LM head gathers over the TP group (a collective even in a group of one): eager.
        return None

    def prepare(self, seqs, num_new_tokens: list[int], block_manager, **kwargs) -> Batch:
        batch = super().prepare(seqs, num_new_tokens, block_manager, **kwargs)
        num_micro = num_micro_batches(self.parallel.micro_batches, self.parallel.stage.size,
                                      len(seqs), batch.input_ids.shape[0])
        if num_micro == 1 or batch.prompt_rows is not None:
            # (prompt-logprob rows: one micro-batch, so their result is one tensor to rank 0)
            return batch
        # Same numbers on every rank (same scheduler state), so the cut is the same everywhere.
        seq_lens = [s.num_computed_tokens + q for s, q in zip(seqs, num_new_tokens)]
        done = [n == len(s.token_ids) for s, n in zip(seqs, seq_lens)]
        micro = split_batch(batch, micro_batch_bounds(num_new_tokens, num_micro),
                            num_new_tokens, seq_lens, done)
        return PipelinedBatch(**{f.name: getattr(batch, f.name)
                                 for f in dataclasses.fields(Batch)}, micro=micro)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Forward this stage; return float32 logits [num_sampled, vocab] on global rank 0
        and on the last stage (an uninitialised tensor of that shape elsewhere)."""
        world = self.parallel.groups.world
        # (spawned ranks replay rank 0's calls and a world of one has no peer: cannot diverge)
        if world.launcher != "spawn" and world.size > 1:
            self._check_same_batch(batch, world)
        self.num_steps += 1
        if self.parallel.stage.size == 1:  # TP only, or a world of one: no hand-offs
            return super().run(batch)
        micro = batch.micro if isinstance(batch, PipelinedBatch) else [batch]
        return self._run_pipelined(batch, micro)

    def _run_pipelined(self, batch: Batch, micro: list[Batch]) -> torch.Tensor:
        stage, spec = self.parallel.stage, self.spec
        world, driver = self.parallel.groups.world, self.parallel.groups.last_stage_driver
        # Receives for every micro-batch are posted up front, so transfers run during compute.
        inbox = [] if stage.is_first else [self._receive_hidden(m, mb) for m, mb in enumerate(micro)]
        outbox = []  # (tensor, work) of non-blocking sends: the tensor must outlive the send
        parts = []   # last stage: logits of each micro-batch's sampled rows
        for m, mb in enumerate(micro):
            if self.trace:
                self.trace.before_start(self.num_steps, m, len(micro))
            intermediate = None
            if inbox:
                intermediate, works = inbox[m]
                for work in works:
                    work.wait()
            if self.trace:
                self.trace.started(self.num_steps, m, len(micro))
            out = self.model.forward(mb.input_ids, mb.positions, self.kv_caches, mb.meta,
                                     intermediate)
            if not stage.is_last:
                for i, t in enumerate(out):
                    t = t.contiguous()
                    outbox.append((t, dist.isend(t, dst=stage.next_rank,
                                                 tag=m * self.num_intermediates + i)))
            elif mb.prompt_rows is not None:  # always before the logits: NCCL pairs in order
                mb.prompt_rows.result = result = reduce_rows(self.model.compute_logits, out,
                                                             mb.prompt_rows)
                if world.rank == driver:
                    outbox.append((result, dist.isend(result, dst=0, tag=_PROMPT_LOGPROBS_TAG)))
            if stage.is_last and mb.sample_seqs:  # every TP rank: the head all-gathers
                part = self.model.compute_logits(out[mb.sample_indices]).float()
                parts.append(part)
                if world.rank == driver:
                    outbox.append((part, dist.isend(part, dst=0, tag=_LOGITS_TAG + m)))
            if self.trace:
                self.trace.record(self.num_steps, "end", m)
        num_sampled = len(batch.sample_seqs)
        if stage.is_last:
            logits = (torch.cat(parts) if parts else
                      torch.empty((0, spec.vocab_size), dtype=torch.float32, device=self.device))
        else:
            logits = torch.empty((num_sampled, spec.vocab_size), dtype=torch.float32,
                                 device=self.device)
            rows = batch.prompt_rows
            if world.rank == 0 and rows is not None:
                rows.result = torch.empty((rows.num_rows, rows.result_width),
                                          dtype=torch.float32, device=self.device)
                dist.recv(rows.result, src=driver, tag=_PROMPT_LOGPROBS_TAG)
            if world.rank == 0 and num_sampled:
                self._receive_logits(logits, micro, driver)
        for _, work in outbox:
            work.wait()
        if self.trace:
            self.trace.end_step()
        return logits

    def _receive_hidden(self, m: int, mb: Batch):
        """Post the receives of micro-batch m's intermediate tensors: (tensors, works)."""
        shape = (mb.input_ids.shape[0], self.spec.hidden_size)
        tensors = tuple(torch.empty(shape, dtype=self.spec.dtype, device=self.device)
                        for _ in range(self.num_intermediates))
        works = [dist.irecv(t, src=self.parallel.stage.prev_rank,
                            tag=m * self.num_intermediates + i) for i, t in enumerate(tensors)]
        return tensors, works

    def _receive_logits(self, logits: torch.Tensor, micro: list[Batch], driver: int) -> None:
        # logits: [num_sampled, vocab]; micro-batch m's rows are the next len(sample_seqs).
        works, row = [], 0
        for m, mb in enumerate(micro):
            n = len(mb.sample_seqs)
            if n:
                works.append(dist.irecv(logits[row:row + n], src=driver, tag=_LOGITS_TAG + m))
            row += n
        for work in works:
            work.wait()

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


def split_batch(batch: Batch, bounds: list[tuple[int, int]], q_lens: list[int],
                seq_lens: list[int], done: list[bool]) -> list[Batch]:
    """Micro-batches of sequences [a, b) each, cut from ``batch`` on the device (no uploads).

    q_lens/seq_lens/done: per sequence, host values (query tokens this step, length after
    it, whether it is sampled). Each micro-batch's metadata is that of a step holding only
    its sequences: rows renumbered from 0, its own max query/key lengths."""
    cu = list(itertools.accumulate(q_lens, initial=0))
    num_done = list(itertools.accumulate(done, initial=0))
    # On a GPU, copies: Triton compiles a kernel variant per 16-byte alignment of each
    # pointer, and views at arbitrary offsets would bring new variants (compiles) mid-run.
    own = torch.clone if batch.input_ids.is_cuda else (lambda t: t)
    meta, out = batch.meta, []
    for a, b in bounds:
        t0, t1, k0, k1 = cu[a], cu[b], num_done[a], num_done[b]
        q = q_lens[a:b]
        sub_meta = dataclasses.replace(
            meta, slot_mapping=own(meta.slot_mapping[t0:t1]),
            cu_seqlens_q=meta.cu_seqlens_q[a:b + 1] - t0, seq_lens=own(meta.seq_lens[a:b]),
            block_tables=own(meta.block_tables[a:b]), max_seqlen_q=max(q),
            max_seqlen_k=max(seq_lens[a:b]), is_decode=all(n == 1 for n in q))
        num_decode_prefix = next((i for i, n in enumerate(q) if n != 1), len(q))
        out.append(Batch(own(batch.input_ids[t0:t1]), own(batch.positions[t0:t1]), sub_meta,
                         batch.sample_indices[k0:k1] - t0, batch.sample_seqs[k0:k1],
                         num_decode_prefix))
    return out


def _layer_owner(model):
    from hpcinfer.distributed.pipeline import layer_container
    return layer_container(model)[1]


class DistributedSampler:
    """Rank 0 samples; everyone gets its SamplerOutput."""

    def __init__(self, sampler, world):
        self.sampler, self.world = sampler, world

    def __getattr__(self, name):  # make_generator, vocab_size, device, generator
        return getattr(self.sampler, name)

    def __call__(self, logits: torch.Tensor, seqs, eos_token_ids, grammar_mask=None,
                 all_plain: bool = False):
        # grammar_mask: filled on rank 0 only (engine/structured.py), None elsewhere
        box = [self.sampler(logits, seqs, eos_token_ids, grammar_mask, all_plain=all_plain)
               if self.world.rank == 0 else None]
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
