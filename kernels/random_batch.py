"""Random paged-KV batches for kernel tests and benchmarks (CPU interpreter and GPU alike).

Builds a step as the engine would: sequences with some cached context and this step's query
tokens, block tables drawn from a shuffled pool (so neighbouring tokens live in scattered
blocks), the slot mapping of the new tokens, and caches whose unused slots hold NaN so that
a kernel reading a key it must not see fails the comparison instead of passing by luck.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedBatch:
    q: torch.Tensor              # [num_tokens, num_heads, head_dim]
    k: torch.Tensor              # [num_tokens, num_kv_heads, head_dim], this step's keys
    v: torch.Tensor
    k_cache: torch.Tensor        # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor   # [num_tokens] int64
    cu_seqlens_q: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor       # [num_seqs] int32
    block_tables: torch.Tensor   # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_seqlen_q: int
    max_seqlen_k: int


def make_paged_batch(seq_lens: list[int], q_lens: list[int], *, num_heads: int,
                     num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu", seed: int = 0, spare_blocks: int = 2,
                     poison: bool = True) -> PagedBatch:
    """A step where sequence i has seq_lens[i] tokens in total, the last q_lens[i] of them new.

    The cache already holds the first seq_lens[i] - q_lens[i] tokens of each sequence (random
    values); the new tokens' k/v are returned separately and their slots are in slot_mapping,
    not yet written (call reshape_and_cache first, as the backends do).
    """
    if len(seq_lens) != len(q_lens) or any(q > s for q, s in zip(q_lens, seq_lens)):
        raise ValueError(f"need q_lens[i] <= seq_lens[i], got {q_lens} vs {seq_lens}")
    gen = torch.Generator().manual_seed(seed)                      # layout: CPU, cheap
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq + [1])
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    context_slots, new_slots, used = [], [], 0
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, q_lens)):
        table = pool[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        block_tables[i, :len(table)] = table.int()
        positions = torch.arange(seq_len)
        token_slots = table[positions // block_size] * block_size + positions % block_size
        context_slots.append(token_slots[:seq_len - q_len])
        new_slots.append(token_slots[seq_len - q_len:])
    # Values: drawn on the target device (GPU-sized caches would be slow to fill on the CPU).
    dev_gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=dev_gen, device=device).to(dtype)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = rand(*cache_shape), rand(*cache_shape)
    if poison:
        # Only cached context holds numbers; this step's slots and unused slots hold NaN.
        is_context = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        is_context[torch.cat(context_slots + [torch.zeros(0, dtype=torch.long)])] = True
        unused = (~is_context).to(device)
        k_cache.view(-1, num_kv_heads, head_dim)[unused] = float("nan")
        v_cache.view(-1, num_kv_heads, head_dim)[unused] = float("nan")
    num_tokens = sum(q_lens)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    return PagedBatch(
        q=rand(num_tokens, num_heads, head_dim), k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        k_cache=k_cache, v_cache=v_cache,
        slot_mapping=torch.cat(new_slots + [torch.zeros(0, dtype=torch.long)]).to(device),
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                          device=device),
        block_tables=block_tables.to(device), max_seqlen_q=max(q_lens + [0]),
        max_seqlen_k=max(seq_lens + [0]),
    )
