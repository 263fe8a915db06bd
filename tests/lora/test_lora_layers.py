"""Which way a wrapped layer computes its shrink (hpcinfer/lora/layers.py), and what stacking
the slots' A under the base weight keeps: the loaded weight and bias, their use without an
adapter row, and the same output as the separate shrink."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcinfer.layers.linear import ColumnParallelLinear
from hpcinfer.lora.layers import LoRALayer, StepSlots


def wrapped(out=256, max_loras=2, rank=8, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = ColumnParallelLinear(32, out, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    weight = layer.weight.detach().clone()
    slots = StepSlots(16, torch.device("cpu"))
    lora = LoRALayer("proj", layer, max_loras, rank, slots, torch.float32, torch.device("cpu"))
    return layer, lora, slots, weight


@pytest.mark.parametrize("mode,max_loras,stacked", [
    ("auto", 2, True),        # 2 x 8 = 16 rows of A, 16 x 4 <= 256
    ("auto", 16, False),      # 128 rows: more than a quarter of 256
    ("stacked", 16, True),    # forced
    ("separate", 2, False)])
def test_the_rule_and_the_override(monkeypatch, mode, max_loras, stacked):
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", mode)
    _, lora, _, _ = wrapped(max_loras=max_loras)
    assert lora.stacked is stacked


def test_the_rule_is_the_default(monkeypatch):
    monkeypatch.delenv("HPCINFER_LORA_SHRINK", raising=False)
    assert wrapped(max_loras=2)[1].stacked and not wrapped(max_loras=16)[1].stacked


def test_a_bad_mode_says_which_are_valid(monkeypatch):
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", "fused")
    with pytest.raises(ValueError, match="auto, stacked, separate"):
        wrapped()


def test_stacking_keeps_the_weight_and_gives_the_separate_shrinks_output(monkeypatch):
    monkeypatch.setenv("HPCINFER_LORA_SHRINK", "stacked")
    layer, lora, slots, weight = wrapped()
    assert torch.equal(layer.weight, weight)
    assert layer.weight.data_ptr() == lora.stacked_weight.data_ptr()   # a view of its top
    assert lora.lora_a.data_ptr() == lora.stacked_weight[256:].data_ptr()
    g = torch.Generator().manual_seed(1)
    for slot in range(2):
        lora.load(slot, None, torch.randn(8, 32, generator=g), torch.randn(256, 8, generator=g))
    x = torch.randn(5, 32, generator=g)
    base = torch.nn.functional.linear(x, weight, layer.bias)
    slots.set(np.full(5, -1, np.int32))          # no adapter row: the base GEMM alone
    assert torch.equal(layer(x), base)
    row_slots = np.array([0, -1, 1, 1, 0], np.int32)
    slots.set(row_slots)
    got = layer(x)
    want = base.clone()
    for i, s in enumerate(row_slots):
        if s >= 0:
            want[i] += (x[i] @ lora.lora_a[s].t()) @ lora.lora_b[s].t()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], base[1])
