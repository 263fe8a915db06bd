"""The LM head writes fp32 logits: bf16 inputs, no bf16 rounding of the output."""
from __future__ import annotations

import torch

from hpcinfer.layers.embedding import ParallelLMHead, fp32_logits


def test_bf16_logits_are_not_rounded_to_bf16():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 64, generator=g).to(torch.bfloat16)
    got = fp32_logits(hidden, weight)
    want = hidden.float() @ weight.float().t()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # A bf16 output would have lost these bits: the old path differs from the exact one.
    rounded = torch.nn.functional.linear(hidden, weight).float()
    assert (rounded - want).abs().max() > 1e-3


def test_lm_head_compute_logits_uses_fp32_output():
    head = ParallelLMHead(50, 64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 64, generator=torch.Generator().manual_seed(1)))
    head = head.to(torch.bfloat16)
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    logits = head.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (2, 50)
    torch.testing.assert_close(logits, hidden.float() @ head.weight.float().t(),
                               rtol=1e-6, atol=1e-5)
