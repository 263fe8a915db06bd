"""GPU memory sizing for the KV pool: profile the largest step, give the KV cache the rest.

``gpu_memory_utilization`` bounds this process's share of the device. Out of that share come
(1) memory in use that PyTorch's allocator does not own (the CUDA context, cuBLAS workspaces,
other processes), (2) the weights and anything else allocated now, (3) the peak activations
of the largest step, measured by a real forward of ``max_num_batched_tokens`` tokens with no
KV cache plus the logits and sampler temporaries of ``max_num_seqs`` rows, and (4) a fixed
reserve for the decode CUDA graphs' private pool. The KV pool gets what is left.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

GiB = 2 ** 30
# Decode graphs keep their own pool (activations of <= max_num_seqs rows, split-K scratch):
# ~100 MiB for a 1B model at 256 sequences, more for wide models; this is the headroom.
GRAPH_POOL_RESERVE_BYTES = 512 * 2 ** 20


@dataclass(frozen=True)
class MemoryProfile:
    total: int              # device memory, bytes
    non_torch: int          # used outside our allocator (context, other processes)
    allocated: int          # held by live tensors after profiling (the weights, mostly)
    activation_peak: int    # the profiled step's peak above `allocated`
    kv_budget: int          # what the KV pool may take

    def describe(self) -> str:
        return (f"device {self.total / GiB:.1f} GiB; weights and buffers "
                f"{self.allocated / GiB:.2f} GiB; peak activations {self.activation_peak / GiB:.2f}"
                f" GiB; outside PyTorch {self.non_torch / GiB:.2f} GiB; KV budget "
                f"{self.kv_budget / GiB:.2f} GiB")


@torch.inference_mode()
def profile_step_peak(model, vocab_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                      device: torch.device) -> int:
    """Peak bytes the largest step allocates on top of what is live now.

    The dummy step holds ``max_num_batched_tokens`` tokens split into up to ``max_num_seqs``
    whole sequences (attention runs without a cache over each sequence's own keys), then
    samples one row per sequence as the engine would (fp32 logits, a log-softmax's worth of
    temporaries)."""
    from hpcinfer.layers.attention import AttentionMetadata
    num_tokens = max_num_batched_tokens
    num_seqs = max(1, min(max_num_seqs, num_tokens))
    lens = torch.full((num_seqs,), num_tokens // num_seqs, dtype=torch.int32)
    lens[: num_tokens % num_seqs] += 1
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    positions = torch.arange(num_tokens) - torch.repeat_interleave(cu[:-1].long(), lens.long())
    input_ids = torch.arange(num_tokens) % vocab_size
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        cu_seqlens_q=cu.to(device), seq_lens=lens.to(device),
        block_tables=torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
        max_seqlen_q=int(lens.max()), max_seqlen_k=int(lens.max()), is_decode=False)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    hidden = model.forward(input_ids.to(device), positions.to(device),
                           [None] * model.spec.num_layers, meta)
    logits = model.compute_logits(hidden[cu[1:].to(device).long() - 1]).float()
    del hidden
    torch.log_softmax(logits, dim=-1).argmax(dim=-1)
    logits.clone()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del logits
    return max(peak, 0)


def kv_budget_bytes(model, vocab_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                    utilization: float, device: torch.device) -> MemoryProfile:
    try:
        peak = profile_step_peak(model, vocab_size, max_num_batched_tokens, max_num_seqs, device)
    except (TypeError, ValueError, RuntimeError) as e:
        # A pipeline stage past the first cannot run a whole forward from token ids alone:
        # estimate instead (activations of the widest layer, fp32 logits, with headroom).
        hidden = getattr(model.spec, "hidden_size", 4096)
        peak = (max_num_batched_tokens * hidden * 2 * 16
                + 3 * min(max_num_seqs, max_num_batched_tokens) * vocab_size * 4)
        log.warning("memory profile forward failed (%s); estimating peak activations as "
                    "%.2f GiB", e, peak / GiB)
        torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    allocated = torch.cuda.memory_allocated(device)
    non_torch = max(total - free - reserved, 0)
    budget = int(total * utilization) - non_torch - allocated - peak - GRAPH_POOL_RESERVE_BYTES
    profile = MemoryProfile(total, non_torch, allocated, peak, max(budget, 0))
    log.info("memory profile (gpu_memory_utilization=%.2f): %s", utilization, profile.describe())
    return profile
