"""Structured outputs' bitmask applied to the constrained rows' logits in one launch.

Reference: :func:`apply_grammar_mask_reference` (the torch ops GrammarMask.apply ran on every
device before). Row i of the launch edits ``logits[rows[i]]`` (or ``logits[i]`` without
``rows``) in place from ``bitmask[i]``: bit j of word w allows token 32w + j; tokens the
bitmask does not allow, and tokens at or past ``mask_vocab`` (logits the tokenizer has no
token for), get -inf. One read of the bitmask and a write of the disallowed logits; the torch
ops (a gather of the rows, the bits expanded to a [rows, words, 32] bool tensor, a masked
fill, the tail, a scatter back) cost ~0.15 ms of the step loop's time per step on one H200
host in launches alone (bench/results/structured-outputs-run9-*: ``apply``).

xgrammar's own Triton kernel indexes the bitmask by the logits row; ours keeps the bitmask
compact (one row per constrained row), as the host fills it.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch_checks import (INDEX_DTYPES, KernelArgumentError, check_dim, check_dtype,
                            check_last_dim_contiguous, check_same_device)

BLOCK = 4096   # logits per program: 128 bitmask words


@triton.jit
def _grammar_mask_kernel(logits_ptr, rows_ptr, bitmask_ptr, vocab, mask_vocab, num_words,
                         stride_logits, stride_bitmask,
                         HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    base = tl.program_id(1) * BLOCK
    words = base // 32 + tl.arange(0, BLOCK // 32)
    packed = tl.load(bitmask_ptr + i.to(tl.int64) * stride_bitmask + words,
                     mask=(words * 32 < mask_vocab) & (words < num_words), other=0)
    bits = (packed[:, None] >> tl.arange(0, 32)[None, :]) & 1
    offs = base + tl.arange(0, BLOCK // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
    disallowed = (bits == 0) | (offs >= mask_vocab)
    tl.store(logits_ptr + row * stride_logits + offs, float("-inf"),
             mask=disallowed & (offs < vocab))


def apply_grammar_mask_(logits: torch.Tensor, rows: torch.Tensor | None,
                        bitmask: torch.Tensor, mask_vocab: int) -> None:
    """In place: in ``logits[rows[i]]`` (``logits[i]`` if ``rows`` is None) every token
    ``bitmask[i]`` does not allow, and every token at or past ``mask_vocab``, gets -inf.

    logits: [B, V] float; rows: [N] int32/int64 or None (then N = B); bitmask: [N, W] int32
    with 32 W >= min(V, mask_vocab)."""
    check_dim("logits", logits, 2, "[rows, vocab]")
    check_dtype("logits", logits, (torch.float32, torch.float16, torch.bfloat16))
    check_dim("bitmask", bitmask, 2, "[constrained rows, words]")
    check_dtype("bitmask", bitmask, (torch.int32,))
    check_last_dim_contiguous("logits", logits)
    check_last_dim_contiguous("bitmask", bitmask)
    n, vocab = bitmask.shape[0], logits.shape[1]
    if rows is not None:
        check_dim("rows", rows, 1, "[constrained rows]")
        check_dtype("rows", rows, INDEX_DTYPES)
        check_same_device(logits=logits, rows=rows, bitmask=bitmask)
    else:
        check_same_device(logits=logits, bitmask=bitmask)
    if ((rows is not None and rows.shape[0] != n) or (rows is None and n != logits.shape[0])
            or 32 * bitmask.shape[1] < min(vocab, mask_vocab)):
        raise KernelArgumentError(
            f"shapes disagree: logits {tuple(logits.shape)}, rows "
            f"{None if rows is None else tuple(rows.shape)}, bitmask {tuple(bitmask.shape)}, "
            f"mask_vocab {mask_vocab} (want [B, V], [N] (or None and N = B), [N, W] with "
            "32 W >= min(V, mask_vocab))")
    if n:
        _grammar_mask_kernel[(n, triton.cdiv(vocab, BLOCK))](
            logits, bitmask if rows is None else rows, bitmask, vocab, mask_vocab,
            bitmask.shape[1], logits.stride(0), bitmask.stride(0),
            HAS_ROWS=rows is not None, BLOCK=BLOCK)


def apply_grammar_mask_reference(logits: torch.Tensor, rows: torch.Tensor | None,
                                 bitmask: torch.Tensor, mask_vocab: int) -> None:
    """The same with torch ops, in place (any device)."""
    vocab = logits.shape[1]
    width = min(vocab, mask_vocab)
    bits = _bit_values(bitmask.device)
    target = logits if rows is None else logits[rows]
    disallowed = ((bitmask[:, :, None] & bits) == 0).flatten(1)[:, :width]
    target[:, :width].masked_fill_(disallowed, float("-inf"))
    if width < vocab:   # tokens the tokenizer does not have
        target[:, width:] = float("-inf")
    if rows is not None:
        logits[rows] = target


@functools.lru_cache(maxsize=None)
def _bit_values(device: torch.device) -> torch.Tensor:
    """[32] int32, the value of bit j of a word (made once per device: the reference runs
    every constrained step on the CPU)."""
    return torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32,
                        device=device)
