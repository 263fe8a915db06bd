"""Build flattened batches and paged KV caches the way the engine's ModelRunner does, for tests.

A test keeps, per sequence, its full token list and a block table; each step it says how many
of those tokens the cache already holds (``num_computed``) and gets the step's input_ids,
positions and AttentionMetadata for exactly the remaining tokens. Block 0 is never handed out
(block tables are padded with 0, so a stray read of the padding shows up as garbage).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hpcinfer.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class FlatBatch:
    input_ids: torch.Tensor   # [T] int64
    positions: torch.Tensor   # [T] int64
    meta: AttentionMetadata


def assign_block_tables(max_seq_lens: Sequence[int], block_size: int) -> list[list[int]]:
    """Disjoint block tables, starting at block 1, big enough for each sequence's max length."""
    tables, next_block = [], 1
    for max_len in max_seq_lens:
        num_blocks = -(-max_len // block_size)
        tables.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    return tables


def num_blocks_needed(block_tables: Sequence[Sequence[int]]) -> int:
    """Cache size (in blocks) that holds every block of these tables (plus unused block 0)."""
    return 1 + max((max(t) for t in block_tables if t), default=0)


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu"
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim],
    filled with NaN so a read of a slot nobody wrote poisons the result."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [(torch.full(shape, float("nan"), dtype=dtype, device=device),
             torch.full(shape, float("nan"), dtype=dtype, device=device))
            for _ in range(num_layers)]


def build_batch(token_ids: Sequence[Sequence[int]], block_tables: Sequence[Sequence[int]],
                block_size: int, *, num_computed: Sequence[int] | None = None,
                device: torch.device | str = "cpu") -> FlatBatch:
    """One step over ``token_ids[i][num_computed[i]:]`` of every sequence i.

    token_ids[i]: all tokens of sequence i so far (after this step); num_computed[i]: how many
    of them are already in the cache (default 0: a full prefill).
    """
    num_computed = list(num_computed) if num_computed is not None else [0] * len(token_ids)
    ids, positions, slots, cu_seqlens, seq_lens = [], [], [], [0], []
    for tokens, table, start in zip(token_ids, block_tables, num_computed, strict=True):
        if not 0 <= start < len(tokens):
            raise ValueError(f"num_computed={start} leaves no token of a {len(tokens)}-token "
                             "sequence to run")
        if len(table) * block_size < len(tokens):
            raise ValueError(f"block table of {len(table)} blocks cannot hold {len(tokens)} tokens")
        for pos in range(start, len(tokens)):
            ids.append(tokens[pos])
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        cu_seqlens.append(len(ids))
        seq_lens.append(len(tokens))
    width = max(len(t) for t in block_tables)
    tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    q_lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens))
    return FlatBatch(torch.tensor(ids, dtype=torch.int64, device=device),
                     torch.tensor(positions, dtype=torch.int64, device=device), meta)
