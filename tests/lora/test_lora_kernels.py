"""The batched LoRA shrink/expand Triton kernels (TRITON_INTERPRET=1, tests/conftest.py) vs
the torch reference, on rows mixing three slots and rows without an adapter."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import lora as lora_kernels
from hpcinfer.kernels import lora_reference
from hpcinfer.kernels.launch_checks import KernelArgumentError


def _case(num_tokens=7, k=40, n=24, rank=5, num_slots=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=gen)
    a = torch.randn(num_slots, rank, k, generator=gen)
    b = torch.randn(num_slots, n, rank, generator=gen)
    slots = torch.tensor([0, -1, 2, 1, 2, -1, 0][:num_tokens], dtype=torch.int32)
    return x, a, b, slots


def test_shrink_matches_reference_and_zeroes_rows_without_adapter():
    x, a, _, slots = _case()
    got = lora_kernels.lora_shrink(x, a, slots)
    want = lora_reference.lora_shrink(x, a, slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[slots < 0] == 0).all()
    torch.testing.assert_close(got[0], x[0] @ a[0].t(), atol=1e-4, rtol=1e-4)


def test_expand_adds_into_a_column_slice_and_leaves_base_rows():
    x, a, b, slots = _case()
    t = lora_reference.lora_shrink(x, a, slots)
    y = torch.randn(7, 3 * 24)
    want = y.clone()
    lora_reference.lora_expand(want[:, 24:48], t, b, slots)
    got = y.clone()
    lora_kernels.lora_expand(got[:, 24:48], t, b, slots)   # the middle piece (as k of qkv)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, :24], y[:, :24]) and torch.equal(got[slots < 0], y[slots < 0])
    assert not torch.equal(got[slots >= 0], y[slots >= 0])


def test_launchers_refuse_mismatched_arguments():
    x, a, b, slots = _case()
    with pytest.raises(KernelArgumentError, match="one slot index per token row"):
        lora_kernels.lora_shrink(x, a, slots[:3])
    with pytest.raises(KernelArgumentError, match="input features"):
        lora_kernels.lora_shrink(x[:, :8], a, slots)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):
        lora_kernels.lora_expand(torch.zeros(7, 25), torch.zeros(7, 5), b, slots)
