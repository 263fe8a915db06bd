"""vLLM's presence/frequency/repetition penalties in one pass over the penalised rows' logits.

Reference: :func:`hpcinfer.engine.sampler.apply_penalties` (on rows gathered from the
sampler's PenaltyState, engine/penalties.py). Row i of the launch edits ``logits[rows[i]]``
in place from the state's row ``slots[i]`` (output counts int32, prompt mask bool) and its
three factors: one read of the logits, counts and mask and one write of the logits. The torch
ops do the same in ~12 passes over [rows, vocab] tensors plus two gathers of the state's rows
and a scatter back (~4-5 GB a step for 256 rows of a 128k vocabulary), which made a
repetition_penalty step ~1.5 ms slower than one without on an H200 (docs/performance.md).

On a GPU the compiler may contract ``x - f * count`` into one fused multiply-add, so results
can differ from the torch reference in the last bit; under the interpreter they do not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_checks import (INDEX_DTYPES, KernelArgumentError, check_dim, check_dtype,
                            check_last_dim_contiguous, check_same_device)

BLOCK = 2048


@triton.jit
def _penalties_kernel(logits_ptr, rows_ptr, slots_ptr, counts_ptr, mask_ptr, factors_ptr,
                      vocab, stride_logits, stride_counts, stride_mask,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i).to(tl.int64)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    presence = tl.load(factors_ptr + 3 * i)
    frequency = tl.load(factors_ptr + 3 * i + 1)
    repetition = tl.load(factors_ptr + 3 * i + 2)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < vocab
    x = tl.load(logits_ptr + row * stride_logits + offs, mask=ok, other=0.0)
    count = tl.load(counts_ptr + slot * stride_counts + offs, mask=ok, other=0)
    in_prompt = tl.load(mask_ptr + slot * stride_mask + offs, mask=ok, other=0) != 0
    in_output = count > 0
    # repetition: tokens in the prompt or the output; then frequency and presence
    x = tl.where(in_prompt | in_output, tl.where(x > 0, x / repetition, x * repetition), x)
    x = x - frequency * count.to(tl.float32)
    x = x - presence * in_output.to(tl.float32)
    tl.store(logits_ptr + row * stride_logits + offs, x, mask=ok)


def apply_penalties_(logits: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                     output_counts: torch.Tensor, prompt_mask: torch.Tensor,
                     factors: torch.Tensor) -> None:
    """In place: logits[rows[i]] penalised from output_counts[slots[i]] and
    prompt_mask[slots[i]], with factors[i] = (presence, frequency, repetition).

    logits: [B, V] float32; rows, slots: [N]; output_counts: [S, V] int32; prompt_mask:
    [S, V] bool; factors: [N, 3] float32."""
    check_dim("logits", logits, 2, "[rows, vocab]")
    check_dtype("logits", logits, (torch.float32,))
    check_dtype("output_counts", output_counts, (torch.int32,))
    check_dtype("prompt_mask", prompt_mask, (torch.bool,))
    check_dtype("factors", factors, (torch.float32,))
    for name, t in (("rows", rows), ("slots", slots)):
        check_dim(name, t, 1, "[penalised rows]")
        check_dtype(name, t, INDEX_DTYPES)
    for name, t in (("logits", logits), ("output_counts", output_counts),
                    ("prompt_mask", prompt_mask)):
        check_last_dim_contiguous(name, t)
    check_same_device(logits=logits, rows=rows, slots=slots, output_counts=output_counts,
                      prompt_mask=prompt_mask, factors=factors)
    n, vocab = rows.shape[0], logits.shape[1]
    if (slots.shape[0] != n or factors.shape != (n, 3) or not factors.is_contiguous()
            or output_counts.shape[1] != vocab or prompt_mask.shape != output_counts.shape):
        raise KernelArgumentError(
            f"shapes disagree: logits {tuple(logits.shape)}, rows {tuple(rows.shape)}, slots "
            f"{tuple(slots.shape)}, output_counts {tuple(output_counts.shape)}, prompt_mask "
            f"{tuple(prompt_mask.shape)}, factors {tuple(factors.shape)} (want [B, V], [N], "
            "[N], [S, V], [S, V], contiguous [N, 3])")
    if n:
        _penalties_kernel[(n, triton.cdiv(vocab, BLOCK))](
            logits, rows, slots, output_counts, prompt_mask, factors, vocab,
            logits.stride(0), output_counts.stride(0), prompt_mask.stride(0), BLOCK=BLOCK)
