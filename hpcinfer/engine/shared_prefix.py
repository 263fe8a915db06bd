"""Which decode steps attend a prefix shared by every row once (cascade attention).

A batch job usually sends thousands of rows behind one long instruction. With prefix caching
all running rows then begin with the same physical KV blocks, and a decode step's attention
would read those keys once per row: at 1,024 rows behind a 1,024-token prompt that is ~4 GiB
of loads per layer of an 8B model for ~4 MiB of distinct bytes. The decode kernel can instead
attend the shared blocks once for all rows (``shared_prefix_len``,
kernels/decode_attention.py) and each row's own keys as usual.

Such a step runs without its CUDA graph (the graphs are captured without the shared-prefix
launch), so it only pays where the attention saved outweighs the eager launches (a few ms of
host time a step): many rows, a long prefix, and enough KV bytes not read again. A 1B model
with 256 rows behind 1,024 shared tokens would save ~8 GiB of (mostly L2) loads a step, about
what its eager launches cost, and keeps its graphs; an 8B model with 1,024 rows saves
~128 GiB. ``HPCINFER_SHARED_PREFIX_ATTENTION=0`` turns it off (to measure it).
"""
from __future__ import annotations

import os

import numpy as np

# Below these the eager launches of a step can cost more than the attention saved.
MIN_ROWS = 64
MIN_SHARED_TOKENS = 256
# rows x shared tokens x KV bytes per token (all layers, K and V): ~3 ms of loads at ~6 TB/s.
MIN_SAVED_BYTES = 16 * 2**30
ENV = "HPCINFER_SHARED_PREFIX_ATTENTION"


def enabled_by_env() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{ENV}={value!r}: use 1 (default: on where it pays) or 0 (off)")
    return value not in ("0", "false", "off")


def shared_prefix_tokens(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                         kv_bytes_per_token: int) -> int:
    """Keys every row of a decode step shares, as whole blocks (0: none, or not worth it).

    ``block_tables`` [rows, width] and ``seq_lens`` [rows] (lengths after this step's token)
    are the step's host arrays; ``kv_bytes_per_token`` the KV cache's bytes per token over
    all layers. A block counts as shared when every row's table holds the same physical
    block at that index and it lies wholly before every row's last key (so it is full, and
    this step writes nothing into it)."""
    min_tokens = max(MIN_SHARED_TOKENS, -(-MIN_SAVED_BYTES // max(
        block_tables.shape[0] * kv_bytes_per_token, 1)))
    rows = block_tables.shape[0]
    if rows < MIN_ROWS or block_tables.shape[1] == 0:
        return 0
    # Blocks before every row's last key: the step writes position seq_len - 1.
    limit = min(int(seq_lens.min()) - 1, block_tables.shape[1] * block_size) // block_size
    if limit * block_size < min_tokens:
        return 0
    first = block_tables[:, 0]
    if (first != first[0]).any():        # the common case for unrelated rows: one column
        return 0
    same = (block_tables[:, :limit] == block_tables[0, :limit]).all(axis=0)
    blocks = limit if same.all() else int(np.argmin(same))
    tokens = blocks * block_size
    return tokens if tokens >= min_tokens else 0
