"""CUDA graphs for decode steps: one graph per batch size of a ladder, captured at start-up.

A decode step of a small model is ~200 kernel launches; launched one by one from Python they
cost more host time than the GPU needs to run them. A graph replays the whole forward with
one launch. Graphs are captured for batch sizes 1, 2, 4, 8, 16, 24, 32, ... up to
``max_num_seqs`` (every 8 after 16, as vLLM); a batch of n sequences replays the smallest
graph of size >= n with the rows past n padded.

Static buffers (one set, shared by every graph; graph ``bs`` reads their first ``bs`` rows):

  input_ids, positions, slot_mapping   [max_bs] int64   padded rows: id 0, position 0, slot -1
  seq_lens                             [max_bs] int32   padded rows: 0 (the kernel writes 0s)
  block_tables                         [max_bs, max_blocks_per_seq] int32
  cu_seqlens_q                         [max_bs + 1] int32 = arange (one query per sequence)

The decode kernel's grid depends only on the block table's width (its capacity), not on the
lengths, so a graph stays valid while sequences grow. Stale block-table entries past a
sequence's length are never read (the kernel stops at seq_lens). Graphs share one memory
pool, captured largest first; their outputs alias each other, so a step must consume its
hidden states (``compute_logits`` gathers rows into a new tensor) before the next replay.

The LM head is captured too (``logits_fn``: the model's compute_logits) when its fp32 logits
of ``max_num_seqs`` rows fit in GRAPH_LOGITS_MAX_BYTES: a pure decode step whose every row
samples then takes its logits from the replay (``replayed_logits``) instead of an eager
matmul after it. Why: on one H200 workload A's eager LM head took ~0.36 ms of the step
loop's time per step (cProfile, 2026-12-04) in a step whose host work (2.47 ms) was as long
as its GPU work (2.34 ms), so the GPU waited for the host. HPCINFER_GRAPH_LOGITS=0 leaves
it out.

With LoRA (``lora``: the engine's LoRAManager) the graphs include the shrink/expand kernels
of every wrapped layer, captured over two more static inputs that live in the manager and
never move: each layer's slot weights (a slot swap copies into them) and the step's slot
index per row (``StepSlots.buffer``, written by the manager before the replay; padded rows
get the null slot -1, whose contribution the kernels skip). docs/lora.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# Mixed steps split off their decodes into a graph from this many decodes on (see forward).
MIN_SPLIT_DECODES = 16
# The LM head goes into the graphs when the largest graph's fp32 logits take at most this
# much of the graph pool (memory.py reserves 512 MiB for it): workload A's 256 rows x 128,256
# logits are 125 MiB; 1,024 rows (workload B) would be 501 MiB, and B's steps are long enough
# that the eager LM head's host time hides behind the GPU's.
GRAPH_LOGITS_MAX_BYTES = 192 * 2 ** 20


def logits_in_graphs(max_num_seqs: int, vocab_size: int) -> bool:
    """Whether the decode graphs capture the LM head (see GRAPH_LOGITS_MAX_BYTES)."""
    if os.environ.get("HPCINFER_GRAPH_LOGITS", "1") == "0":
        return False
    return max_num_seqs * vocab_size * 4 <= GRAPH_LOGITS_MAX_BYTES


def aligned_offsets(sizes: list[int], itemsize: int, align_bytes: int = 16
                    ) -> tuple[list[int], int]:
    """Offsets that start every piece of a packed buffer on an ``align_bytes`` boundary, and
    the total length, in elements.

    Why: Triton specialises a kernel on whether each pointer argument is 16-byte aligned and
    compiles one variant per combination. Index tensors cut from one packed upload at
    arbitrary offsets would make the variants depend on the batch sizes, so new compiles
    (0.3-0.5 s each) would keep appearing in the middle of a run."""
    step = max(align_bytes // itemsize, 1)
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // step) * step
    return offsets, total


def graph_safe(model) -> bool:
    """True if every attention layer uses a backend that never syncs with the host (the
    ``triton`` one). ``torch_ref`` reads lengths on the host, which graph capture forbids."""
    from hpcinfer.layers.attention import Attention
    backends = {m.backend.name for m in model.modules() if isinstance(m, Attention)}
    return backends == {"triton"}


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... capped at and always including max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Captures and replays decode forwards. ``run(batch)`` -> hidden [num_seqs, hidden]."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks_per_seq: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, lora=None,
                 logits_fn=None):
        from hpcinfer.layers.attention import AttentionMetadata
        self._meta_cls = AttentionMetadata
        self.model, self.kv_caches, self.device = model, kv_caches, device
        # LoRA: each token row's slot index, a static input of every graph (None: no LoRA)
        self.lora_slots = lora.step_slots if lora is not None else None
        self.sizes = batch_size_ladder(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.block_size = kv_caches[0][0].shape[1]
        long_kw = dict(dtype=torch.int64, device=device)
        int_kw = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(self.max_bs, **long_kw)
        self.positions = torch.zeros(self.max_bs, **long_kw)
        self.slot_mapping = torch.full((self.max_bs,), -1, **long_kw)
        self.seq_lens = torch.zeros(self.max_bs, **int_kw)
        self.block_tables = torch.zeros(self.max_bs, max_blocks_per_seq, **int_kw)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, **int_kw)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # bs -> hidden [bs, hidden_size]
        # bs -> float32 logits [bs, vocab] when the LM head is captured (logits_fn)
        self.logits_fn = logits_fn
        self.logits: dict[int, torch.Tensor] = {}
        # The last forward's logits [n, vocab] if it was one replay of a pure decode step
        # with the LM head in it, else None (a view of the graph's output, like hidden).
        self.replayed_logits: torch.Tensor | None = None
        self.capture_s = 0.0
        self.num_replays = 0
        self.num_logits_replays = 0   # replays that gave their step's logits too
        self.num_splits = 0      # mixed steps run as decode graph + eager prefill
        self.num_split_attention = 0   # mixed steps run eagerly with a DecodeSplit
        self.num_shared_prefix = 0     # decode steps run eagerly over a shared prefix

    def _meta(self, bs: int):
        return self._meta_cls(
            slot_mapping=self.slot_mapping[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
            max_seqlen_q=1, max_seqlen_k=self.block_tables.shape[1] * self.block_size,
            is_decode=True)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:bs], self.positions[:bs], self.kv_caches,
                                  self._meta(bs))

    def _graph_body(self, bs: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a graph runs: the forward, and the LM head on all its rows if captured."""
        hidden = self._forward(bs)
        return hidden, None if self.logits_fn is None else self.logits_fn(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size of the ladder (largest first, so smaller graphs reuse its pool).

        With all slots at -1 and lengths 0 the capture forwards write nothing to the KV cache."""
        start = time.perf_counter()
        with self._lora_applied(self.max_bs):
            self.warm_up_prefill()
        pool = None
        for bs in reversed(self.sizes):
            with self._lora_applied(bs):
                self._graph_body(bs)   # warm-up outside capture: Triton compiles, cuBLAS plans
                self.graphs[bs], (self.outputs[bs], self.logits[bs]), pool = \
                    self._capture_one(bs, pool)
        self._synchronize()
        self.capture_s = time.perf_counter() - start
        log.info("CUDA graphs: captured %d decode batch sizes (1..%d)%s in %.1f s",
                 len(self.sizes), self.max_bs,
                 " with the LM head" if self.logits_fn is not None else "", self.capture_s)

    def _capture_one(self, bs: int, pool):
        """(graph, its outputs (hidden, logits or None), the shared memory pool) for batch
        size ``bs``."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outs = self._graph_body(bs)
        return graph, outs, pool if pool is not None else graph.pool()

    def _synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def _lora_applied(self, num_rows: int):
        """Capture with the LoRA kernels in (over null slots), whatever the current step."""
        if self.lora_slots is None:
            return contextlib.nullcontext()
        return self.lora_slots.always_applied(num_rows)

    @torch.inference_mode()
    def warm_up_prefill(self) -> None:
        """Compile the paged prefill kernels' tile variants now (prefill_config picks one for
        max_seqlen_q <= 16, another above), not in the middle of the first mixed steps.

        Dummy steps over the cache: slots -1 (nothing is written), block tables all 0 (block
        0 is read and the result discarded)."""
        device = self.device
        for q_len, num_seqs in ((1, 2), (32, 1)):
            num_tokens = q_len * num_seqs
            meta = self._meta_cls(
                slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
                cu_seqlens_q=torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * q_len,
                seq_lens=torch.full((num_seqs,), q_len, dtype=torch.int32, device=device),
                block_tables=torch.zeros(num_seqs, self.block_tables.shape[1],
                                         dtype=torch.int32, device=device),
                max_seqlen_q=q_len, max_seqlen_k=q_len, is_decode=False)
            positions = torch.arange(q_len, device=device).repeat(num_seqs)
            self.model.forward(torch.zeros(num_tokens, dtype=torch.int64, device=device),
                               positions, self.kv_caches, meta)

    def forward(self, batch) -> torch.Tensor:
        """hidden [num_tokens, hidden] for any step: a pure decode step replays a graph; a
        mixed step with at least MIN_SPLIT_DECODES leading one-token sequences runs those
        through a graph and the rest (prefill chunks) eagerly; anything else runs eagerly.

        Why split: the varlen prefill kernel serves one query head per program, so each
        decode row in a mixed step reads its whole KV context once per query head instead of
        once per KV head (4x for Llama-3's GQA). One extra pass over the weights costs less
        than that as soon as a few dozen decodes share the step."""
        meta = batch.meta
        n = batch.input_ids.shape[0]
        fits = meta.block_tables.shape[1] <= self.block_tables.shape[1]
        self.replayed_logits = None
        if batch.positions.dim() != 1:  # M-RoPE rows of image tokens: the buffer is [T]
            return self.model.forward(batch.input_ids, batch.positions, self.kv_caches, meta)
        if meta.is_decode and meta.shared_prefix_len:
            # Captured without the shared-prefix launch: eager (engine/shared_prefix.py
            # chooses such steps only where the attention saved outweighs the launches).
            self.num_shared_prefix += 1
            return self.model.forward(batch.input_ids, batch.positions, self.kv_caches, meta)
        if meta.is_decode and n <= self.max_bs and fits:
            hidden = self._replay(batch.input_ids, batch.positions, meta.slot_mapping,
                                  meta.seq_lens, meta.block_tables)
            logits = self.logits.get(self.padded_size(n))
            if logits is not None:
                self.replayed_logits = logits[:n]
                self.num_logits_replays += 1
            return hidden
        k = min(batch.num_decode_prefix, self.max_bs)
        if meta.decode_split is not None:
            # One eager pass over the weights; attention splits decode rows from prefill
            # chunks itself (layers/attention.py DecodeSplit).
            self.num_split_attention += 1
            return self.model.forward(batch.input_ids, batch.positions, self.kv_caches, meta)
        if meta.is_decode or k < MIN_SPLIT_DECODES or not fits:
            return self.model.forward(batch.input_ids, batch.positions, self.kv_caches, meta)
        # Rows [0, k) are sequences with one query token each (token i = sequence i).
        rest_lora_slots = self._take_lora_slots(k, n)
        decode = self._replay(batch.input_ids[:k], batch.positions[:k], meta.slot_mapping[:k],
                              meta.seq_lens[:k], meta.block_tables[:k])
        self._put_lora_slots(rest_lora_slots)
        # clone(): slices at row k start at arbitrary offsets; fresh tensors are aligned,
        # so the kernels see the alignment they were compiled for (see aligned_offsets).
        rest = self._meta_cls(
            slot_mapping=meta.slot_mapping[k:].clone(), cu_seqlens_q=meta.cu_seqlens_q[k:] - k,
            seq_lens=meta.seq_lens[k:].clone(), block_tables=meta.block_tables[k:].clone(),
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, is_decode=False)
        prefill = self.model.forward(batch.input_ids[k:], batch.positions[k:].clone(),
                                     self.kv_caches, rest)
        self.num_splits += 1
        return torch.cat([decode, prefill])   # copies the graph's output before any replay

    def _take_lora_slots(self, k: int, n: int) -> torch.Tensor | None:
        """A copy of the prefill rows' LoRA slots [k, n): the replay pads rows from k on."""
        return None if self.lora_slots is None else self.lora_slots.buffer[k:n].clone()

    def _put_lora_slots(self, rest: torch.Tensor | None) -> None:
        """The prefill rows' slots at the buffer's start, where the eager forward of those
        rows alone reads them (its hooks take the first rows). Stream-ordered after the
        replay, so the graph has read the decode rows' slots by then."""
        if rest is not None:
            self.lora_slots.buffer[:rest.shape[0]].copy_(rest)

    def padded_size(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def _replay(self, input_ids, positions, slot_mapping, seq_lens, block_tables
                ) -> torch.Tensor:
        """Copy one decode batch into the static buffers, replay, return hidden [n, hidden]
        (a view of the graph's output: valid until the next replay)."""
        n = input_ids.shape[0]
        bs = self.padded_size(n)
        width = block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(block_tables, non_blocking=True)
        if bs > n:
            # Padded rows: write no KV (slot -1) and attend to nothing (length 0).
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(0)
        if self.lora_slots is not None:
            # Rows [0, n) hold the step's slots (LoRAManager.prepare_step); padded rows none.
            self.lora_slots.pad(n, bs)
        self.graphs[bs].replay()
        self.num_replays += 1
        return self.outputs[bs][:n]
