"""ModelRunner: owns the model and its KV cache; turns a scheduled step into one forward.

It only *reads* scheduler/block-manager state. A step's batch is flattened as in
kernels/reference.py: ``num_tokens`` query tokens from ``num_seqs`` sequences, with
positions, slot mapping, cu_seqlens and block tables built by numpy array ops (no Python
loop per token), so a 256-sequence decode step costs well under a millisecond of Python.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from hpcinfer.engine.block_manager import BlockManager, cdiv
from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.cuda_graphs import aligned_offsets
from hpcinfer.engine.prompt_logprobs import PromptRows, plan_rows, reduce_rows
from hpcinfer.engine.sequence import Sequence
from hpcinfer.engine.shared_prefix import enabled_by_env, shared_prefix_tokens

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Batch:
    input_ids: torch.Tensor      # [num_tokens] int64
    positions: torch.Tensor      # [num_tokens] int64
    meta: object                 # hpcinfer.layers.attention.AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] rows of the hidden states to sample from
    sample_seqs: list[Sequence]  # the sequences those rows belong to (prefill done)
    num_decode_prefix: int = 0   # leading sequences with one query token (cuda_graphs.py)
    prompt_rows: PromptRows | None = None  # rows owing prompt logprobs (prompt_logprobs.py)
    image_rows: object | None = None  # multimodal.step.ImageRows: rows taking image embeddings


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# kv_cache_dtype -> the cache's torch dtype (None: the model's).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}

def resolve_dtype(name: str, config_dtype, device: torch.device) -> torch.dtype:
    """"auto": the checkpoint's dtype; fp32 checkpoints run in bf16 on GPU, fp32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if isinstance(config_dtype, str):
        config_dtype = _DTYPES.get(config_dtype, getattr(torch, config_dtype, torch.float32))
    dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    if dtype == torch.float32 and device.type == "cuda":
        return torch.bfloat16
    return dtype


class ModelRunner:
    def __init__(self, config: EngineConfig, model, device: torch.device):
        self.config = config
        self.model = model
        self.spec = model.spec
        self.device = device
        self.block_size = config.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.max_blocks_per_seq = 0
        self._staging: dict[type, torch.Tensor] = {}  # pinned host buffers for uploads
        self._copy_done: dict[type, torch.cuda.Event] = {}
        self.graphs = None          # DecodeGraphs once captured (capture_cuda_graphs)
        self.lora = None            # lora.manager.LoRAManager with enable_lora
        # Mixed steps carry a DecodeSplit (layers/attention.py) for the triton backend. Set
        # with the graphs: one process and stage (pipeline micro-batches would not cut it).
        self.split_mixed_attention = False
        self.memory_profile = None  # memory.MemoryProfile when the pool was sized on a GPU
        self.takes_images = getattr(model, "takes_images", False)  # hpcinfer/multimodal
        self.uses_mrope = getattr(model, "uses_mrope", False)      # positions [3, T]
        # Gemma 3: image tokens see their whole span (meta.last_key_positions)
        self.spans_see_ahead = getattr(model, "bidirectional_image_spans", False)
        self.cpu_memory = None      # memory.CpuMemory when it was sized on the CPU
        # Decode steps behind a prefix every row shares attend it once (engine/shared_prefix.py)
        self.shared_prefix_attention = _attends_shared_prefixes(model)
        self.num_shared_prefix_steps = 0
        self._kv_bytes_per_token = None   # set at the first step that looks for a prefix

    # --- KV cache ---
    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The model's dtype, or e4m3 with kv_cache_dtype="fp8" (per-tensor scale 1.0)."""
        return KV_CACHE_DTYPES.get(self.config.kv_cache_dtype) or self.spec.dtype

    def bytes_per_block(self) -> int:
        spec = self.spec
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        return 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * elem

    def allocate_kv_cache(self, max_model_len: int) -> int:
        """Size the pool (see _kv_budget_bytes), allocate it, and return the block count."""
        per_block = self.bytes_per_block()
        self.max_blocks_per_seq = cdiv(max_model_len, self.block_size)
        num_blocks = self._kv_budget_bytes(max_model_len) // per_block
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens "
                f"({num_blocks * per_block / 2**30:.3f} GiB) but one sequence of max_model_len="
                f"{max_model_len} needs {self.max_blocks_per_seq}: raise kv_cache_memory_bytes "
                "(or gpu_memory_utilization; on CPU the job's memory, resources.mem), or "
                "lower max_model_len")
        spec = self.spec
        shape = (num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        dtype = self.kv_cache_dtype
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device))
                          for _ in range(spec.num_layers)]
        self.num_blocks = num_blocks
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB on %s (%s)", num_blocks,
                 self.block_size, num_blocks * self.block_size,
                 num_blocks * per_block / 2**30, self.device, dtype)
        return num_blocks

    def _kv_budget_bytes(self, max_model_len: int) -> int:
        """kv_cache_memory_bytes if given; else what the device can spare, but never more than
        max_num_seqs full-length sequences need (more blocks could never be used at once)."""
        config = self.config
        if config.num_gpu_blocks_override is not None:
            return config.num_gpu_blocks_override * self.bytes_per_block()
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes
        wanted = config.max_num_seqs * cdiv(max_model_len, self.block_size) * self.bytes_per_block()
        if self.device.type == "cuda":
            return min(wanted, self._cuda_spare_bytes())
        # The job's memory limit (cgroup, SLURM_MEM_*), never the machine's free memory.
        from hpcinfer.engine.memory import cpu_kv_budget
        self.cpu_memory = cpu_kv_budget()
        log.info("CPU memory: %s; max_num_seqs x max_model_len need %.2f GiB",
                 self.cpu_memory.describe(), wanted / 2**30)
        return min(wanted, self.cpu_memory.kv_budget)

    @property
    def kv_pool(self) -> dict:
        """The chosen pool and what it was sized from (the worker's metrics line)."""
        pool = {"kv_cache_bytes": self.num_blocks * self.bytes_per_block(),
                "kv_blocks": self.num_blocks, "block_size": self.block_size,
                "device": str(self.device)}
        if self.cpu_memory is not None:
            pool["cpu_memory"] = self.cpu_memory.as_dict()
        if self.memory_profile is not None:
            p = self.memory_profile
            pool["gpu_memory"] = {"total_bytes": p.total, "non_torch_bytes": p.non_torch,
                                  "allocated_bytes": p.allocated,
                                  "activation_peak_bytes": p.activation_peak,
                                  "kv_budget_bytes": p.kv_budget}
        return pool

    def _cuda_spare_bytes(self) -> int:
        # gpu_memory_utilization share minus what is in use and a profiled largest step
        # (hpcinfer/engine/memory.py).
        from hpcinfer.engine.memory import kv_budget_bytes
        config = self.config
        self.memory_profile = kv_budget_bytes(
            self.model, self.spec.vocab_size, config.max_num_batched_tokens,
            config.max_num_seqs, config.gpu_memory_utilization, self.device)
        return self.memory_profile.kv_budget

    def capture_cuda_graphs(self) -> None:
        """Decode CUDA graphs (hpcinfer/engine/cuda_graphs.py); off on CPU or enforce_eager."""
        from hpcinfer.engine.cuda_graphs import DecodeGraphs, graph_safe
        if self.device.type != "cuda" or self.config.enforce_eager or not graph_safe(self.model):
            return
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.max_num_seqs,
                                   self.max_blocks_per_seq, self.spec.hidden_size,
                                   self.spec.dtype, self.device, lora=self.lora,
                                   logits_fn=self.graph_logits_fn())
        self.graphs.capture()
        self.split_mixed_attention = True

    def graph_logits_fn(self):
        """The LM head for the decode graphs to capture (cuda_graphs.logits_in_graphs), or
        None."""
        from hpcinfer.engine.cuda_graphs import logits_in_graphs
        if not logits_in_graphs(self.config.max_num_seqs, self.spec.vocab_size):
            return None
        return lambda hidden: self.model.compute_logits(hidden).float()

    # --- one step ---
    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int],
                block_manager: BlockManager, pending=None) -> Batch:
        """pending: the in-flight step (inflight.InFlight) under async scheduling; rows
        whose input is its placeholder take their token from its device tensor."""
        from hpcinfer.layers.attention import AttentionMetadata, DecodeSplit
        num_seqs = len(seqs)
        if self.lora is not None:  # adapters into slots, each token row's slot
            self.lora.prepare_step(seqs, num_new_tokens)
        q_lens = np.array(num_new_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, num_seqs)
        rows = np.fromiter((s.kv_row for s in seqs), np.int64, num_seqs)
        lengths = np.fromiter((len(s.token_ids) for s in seqs), np.int64, num_seqs)
        seq_lens = starts + q_lens
        is_decode = bool((q_lens == 1).all())
        if is_decode:
            # (not token_ids[-1]: a 1-token prefill chunk is not the last token)
            input_ids = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs), np.int64,
                                    num_seqs)
        else:
            chunks = (s.token_ids[n:n + q] for s, n, q in zip(seqs, starts.tolist(), num_new_tokens))
            input_ids = np.fromiter(itertools.chain.from_iterable(chunks), np.int64)
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu_seqlens[1:])
        num_tokens = int(cu_seqlens[-1])
        # positions: [num_tokens]; each sequence's queries continue from its computed tokens
        positions = np.arange(num_tokens) + np.repeat(starts - cu_seqlens[:-1], q_lens)
        rope_positions = positions
        if self.uses_mrope:  # Qwen2-VL: [3, num_tokens] (multimodal/step.py), or [T]
            from hpcinfer.multimodal.step import mrope_positions
            rope_positions = mrope_positions(seqs, starts, q_lens, positions)
        max_seqlen_k = int(seq_lens.max())
        block_tables = block_manager.block_tables[rows, :cdiv(max_seqlen_k, self.block_size)]
        seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
        blocks = block_tables[seq_of_token, positions // self.block_size]
        slot_mapping = blocks.astype(np.int64) * self.block_size + positions % self.block_size
        # Sequences whose computed tokens reach their length produce a token this step.
        done = seq_lens == lengths
        sample_indices = cu_seqlens[1:][done] - 1
        sample_seqs = [s for s, d in zip(seqs, done.tolist()) if d]
        patch_rows, patch_src = _placeholder_rows(seqs, cu_seqlens, pending)
        prompt_rows = plan_rows(seqs, starts, num_new_tokens, cu_seqlens, self.device)
        image_rows, key_limits = None, []
        if self.takes_images:
            from hpcinfer.multimodal.step import plan_image_rows, span_last_keys
            image_rows = plan_image_rows(seqs, starts, q_lens, cu_seqlens)
            if image_rows is not None and self.spans_see_ahead:
                key_limits = [span_last_keys(image_rows, positions)]
        # Mixed steps: running sequences (one token each) come first (the scheduler's order).
        num_decode_prefix = num_seqs if is_decode else int(np.argmax(q_lens != 1))
        k = num_decode_prefix
        split = self.split_mixed_attention and not is_decode and k > 0
        # The decode rows' tables at full width: the decode graphs' kernel variant (Triton
        # specialises on whether the row stride is a multiple of 16), no mid-run compile.
        decode_tables = block_manager.block_tables[rows[:k]] if split else None
        split_arrays = [seq_lens[:k], decode_tables, cu_seqlens[k:] - cu_seqlens[k],
                        seq_lens[k:], block_tables[k:]] if split else []
        (input_ids, positions, slot_mapping, sample_indices, patch_rows, patch_src), \
            (cu_q, lens, tables, *parts) = self._upload(
                [input_ids, rope_positions, slot_mapping, sample_indices, patch_rows,
                 patch_src],
                [cu_seqlens, seq_lens, block_tables, *split_arrays, *key_limits])
        last_key_positions = parts.pop() if key_limits else None
        if rope_positions.ndim == 2:
            positions = positions.view(3, -1)
        if patch_rows.numel():
            # After the previous step's sampling in stream order; the host never waits.
            input_ids[patch_rows] = pending.tokens[patch_src]
        # The decode rows of a decode step, or of a split mixed step (eager either way when
        # shared: engine/shared_prefix.py), behind a prefix they all share.
        shared = 0
        if self.shared_prefix_attention and (is_decode or split):
            if self._kv_bytes_per_token is None:   # fixed by the config: once, not per step
                self._kv_bytes_per_token = self.bytes_per_block() // self.block_size
            shared = shared_prefix_tokens(block_tables if is_decode else decode_tables,
                                          seq_lens[:k], self.block_size, self._kv_bytes_per_token)
            self.num_shared_prefix_steps += shared > 0
        decode_split = None
        if split:
            width = block_tables.shape[1]
            decode_split = DecodeSplit(
                num_decodes=k, decode_seq_lens=parts[0],
                decode_block_tables=parts[1].view(k, block_manager.block_tables.shape[1]),
                decode_max_seqlen_k=max(self.max_blocks_per_seq * self.block_size,
                                        max_seqlen_k),
                prefill_cu_seqlens_q=parts[2], prefill_seq_lens=parts[3],
                prefill_block_tables=parts[4].view(num_seqs - k, width),
                shared_prefix_len=shared)
            shared = 0   # the metadata's field is for pure decode steps
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, cu_seqlens_q=cu_q, seq_lens=lens,
            block_tables=tables.view(block_tables.shape), max_seqlen_q=int(q_lens.max()),
            max_seqlen_k=max_seqlen_k, is_decode=is_decode, decode_split=decode_split,
            last_key_positions=last_key_positions, shared_prefix_len=shared)
        return Batch(input_ids, positions, meta, sample_indices, sample_seqs, num_decode_prefix,
                     prompt_rows, image_rows)

    def _upload(self, int64_arrays: list[np.ndarray], int32_arrays: list[np.ndarray]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Host arrays -> device tensors (int64 and int32, flattened), in two copies.

        On CPU the tensors share the arrays' memory. On a GPU each dtype group is packed into
        a reused pinned buffer and sent with one asynchronous copy, instead of ~7 small
        synchronous ones. Before a buffer is rewritten we wait for its previous copy (an
        event), which has normally long finished: the step's sampled tokens were read back.
        """
        groups = []
        for dtype, arrays in ((np.int64, int64_arrays), (np.int32, int32_arrays)):
            sizes = [a.size for a in arrays]
            if self.device.type == "cpu":
                groups.append([torch.from_numpy(np.ascontiguousarray(a, dtype=dtype).reshape(-1))
                               for a in arrays])
                continue
            # 16-byte aligned pieces: Triton compiles a kernel variant per pointer alignment.
            offsets, total = aligned_offsets(sizes, np.dtype(dtype).itemsize)
            staging = self._staging_buffer(dtype, total)
            copied = self._copy_done.get(dtype)
            if copied is not None:
                copied.synchronize()
            host = staging.numpy()
            for a, offset in zip(arrays, offsets):
                host[offset:offset + a.size] = a.reshape(-1)
            on_device = staging[:total].to(self.device, non_blocking=True)
            self._copy_done.setdefault(dtype, torch.cuda.Event()).record()
            groups.append([on_device[o:o + n] for o, n in zip(offsets, sizes)])
        return groups[0], groups[1]

    def _staging_buffer(self, dtype, size: int) -> torch.Tensor:
        buffer = self._staging.get(dtype)
        if buffer is None or buffer.numel() < size:
            torch_dtype = torch.int64 if dtype == np.int64 else torch.int32
            buffer = torch.empty(max(size, 1 << 16), dtype=torch_dtype).pin_memory()
            self._staging[dtype] = buffer
        return buffer

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Forward the batch; return float32 logits [num_sampled, vocab] (maybe 0 rows).
        Prompt-logprob rows, if any, are reduced into ``batch.prompt_rows.result``."""
        if batch.image_rows is not None:  # eager: the vision encoder and embeddings first
            from hpcinfer.multimodal.step import image_embeds
            hidden = self.model.forward(batch.input_ids, batch.positions, self.kv_caches,
                                        batch.meta, image_embeds=image_embeds(
                                            batch.image_rows, self.model, self.device))
        elif self.graphs is not None:
            hidden = self.graphs.forward(batch)   # graph replay, split or eager as fits
            logits = self.graphs.replayed_logits
            if (logits is not None and batch.prompt_rows is None
                    and len(batch.sample_seqs) == logits.shape[0]):
                return logits   # the LM head ran in the replay; every row samples, in order
        else:
            hidden = self.model.forward(batch.input_ids, batch.positions, self.kv_caches,
                                        batch.meta)
        if batch.prompt_rows is not None:
            batch.prompt_rows.result = reduce_rows(self.model.compute_logits, hidden,
                                                   batch.prompt_rows)
        if not batch.sample_seqs:
            return hidden.new_empty((0, self.spec.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[batch.sample_indices]).float()


def _attends_shared_prefixes(model) -> bool:
    """Shared-prefix decode attention: on (unless HPCINFER_SHARED_PREFIX_ATTENTION=0) when some
    layer can use it: the triton backend, causal, no sliding window (torch_ref and windowed
    layers attend every row's keys as usual, so looking for a prefix would cost for nothing)."""
    from hpcinfer.layers.attention import Attention
    return enabled_by_env() and any(
        m.backend.name == "triton" and m.spec.causal and m.spec.sliding_window is None
        for m in model.modules() if isinstance(m, Attention))


def _placeholder_rows(seqs: list[Sequence], cu_seqlens: np.ndarray, pending
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(flat input rows holding a placeholder, their rows in pending.tokens). A placeholder
    is always its sequence's last token and the step's only query token for it."""
    if pending is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, src = [], []
    index = pending.index
    for i, seq in enumerate(seqs):
        if seq.has_placeholder:
            rows.append(cu_seqlens[i])
            src.append(index[id(seq)])
    return np.array(rows, np.int64), np.array(src, np.int64)
