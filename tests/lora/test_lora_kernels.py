"""The batched LoRA shrink/expand Triton kernels (TRITON_INTERPRET=1, tests/conftest.py) vs
the torch reference: rows mixing three slots and rows without an adapter, split-K partials,
merged layers (pieces of one output taking their own rank block), row tiles of base rows
only, and column slices of a wider output."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import lora as lora_kernels
from hpcinfer.kernels import lora_reference
from hpcinfer.kernels.launch_checks import KernelArgumentError


def _case(num_tokens=7, k=40, n=24, rank=5, num_slots=3, seed=0, pieces=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=gen)
    a = torch.randn(num_slots, pieces * rank, k, generator=gen)
    b = torch.randn(num_slots, n, rank, generator=gen)
    pattern = torch.tensor([0, -1, 2, 1, 2, -1, 0], dtype=torch.int32)
    slots = pattern.repeat(-(-num_tokens // 7))[:num_tokens].contiguous()
    return x, a, b, slots


def test_shrink_matches_reference_and_zeroes_rows_without_adapter():
    x, a, _, slots = _case()
    got = lora_kernels.lora_shrink(x, a, slots)
    want = lora_reference.lora_shrink(x, a, slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got[slots < 0] == 0).all()
    torch.testing.assert_close(got[0], x[0] @ a[0].t(), atol=1e-4, rtol=1e-4)


def test_shrink_splits_k_into_partials_that_sum_to_the_reference():
    # K = 1100: 4 splits of 384 columns, the last one past K (it stores zeros)
    x, a, _, slots = _case(num_tokens=40, k=1100, rank=4, pieces=3)
    assert lora_kernels.shrink_split(40, 1100) == 4
    parts = lora_kernels.lora_shrink_partials(x, a, slots)
    assert parts.shape == (4, 40, 12) and parts.dtype == torch.float32
    assert (parts[3] == 0).all() and not (parts[1] == 0).all()
    want = lora_reference.lora_shrink(x, a, slots)
    torch.testing.assert_close(parts.sum(0), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("num_tokens,k", [(40, 4096), (600, 1024)])
def test_shrink_split_is_the_number_of_partials_the_launch_makes(num_tokens, k):
    # decode-sized calls (<= DECODE_ROWS rows) and prefill-sized ones choose their splits by
    # different rules; the H200 GPU test caught shrink_split answering with the prefill rule
    # for decode-sized calls (16 where the launch made 8)
    x, a, _, slots = _case(num_tokens=num_tokens, k=k, rank=4, pieces=1)
    parts = lora_kernels.lora_shrink_partials(x, a, slots)
    assert parts.shape[0] == lora_kernels.shrink_split(num_tokens, k) > 1


def test_expand_adds_into_a_column_slice_and_leaves_base_rows():
    x, a, b, slots = _case()
    t = lora_reference.lora_shrink(x, a, slots)
    y = torch.randn(7, 3 * 24)
    want = y.clone()
    lora_reference.lora_expand(want[:, 24:48], t, b, slots)
    got = y.clone()
    lora_kernels.lora_expand(got[:, 24:48], t, b, slots)   # the middle of a wider output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[:, :24], y[:, :24]) and torch.equal(got[slots < 0], y[slots < 0])
    assert not torch.equal(got[slots >= 0], y[slots >= 0])


@pytest.mark.parametrize("bounds", [(0, 40, 56, 72), (0, 130, 200, 300), (0, 150, 300)])
def test_expand_merged_pieces_from_shrink_partials(bounds):
    # One expand for q/k/v (or gate/up): piece p's columns take rank block p of the shrink.
    # (0, 40, 56, 72): all pieces in one 128-column tile; the others straddle tiles.
    pieces, n, rank = len(bounds) - 1, bounds[-1], 6
    x, a, b, slots = _case(num_tokens=9, k=600, n=n, rank=rank, pieces=pieces, seed=1)
    parts = lora_kernels.lora_shrink_partials(x, a, slots)
    assert parts.shape[0] == 2
    y = torch.randn(9, n)
    got, want = y.clone(), y.clone()
    lora_kernels.lora_expand(got, parts, b, slots, bounds)
    for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])):   # piece by piece, the old way
        t = lora_reference.lora_shrink(x, a[:, p * rank:(p + 1) * rank], slots)
        lora_reference.lora_expand(want[:, lo:hi], t, b[:, lo:hi].contiguous(), slots)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    ref = y.clone()
    lora_reference.lora_expand(ref, parts, b, slots, bounds)   # the reference's own pieces
    torch.testing.assert_close(ref, want, atol=1e-3, rtol=1e-4)
    assert torch.equal(got[slots < 0], y[slots < 0])


def test_bf16_merged_layer_against_the_fp32_reference():
    # bf16 tiles through tensor-core dots on a GPU (fp32 copies under the interpreter, whose
    # bf16 dot is broken); the shrink is summed in fp32 and rounded to bf16 once.
    bounds = (0, 96, 128, 160)
    x, a, b, slots = _case(num_tokens=20, k=700, n=160, rank=16, num_slots=3, seed=4, pieces=3)
    x, a, b = x.bfloat16(), (a / 26).bfloat16(), (b / 4).bfloat16()
    parts = lora_kernels.lora_shrink_partials(x, a, slots)
    want_t = lora_reference.lora_shrink(x.float(), a.float(), slots)
    torch.testing.assert_close(parts.sum(0), want_t, atol=1e-3, rtol=1e-3)
    y = torch.randn(20, 160).bfloat16()
    got, want = y.clone(), y.float()
    lora_kernels.lora_expand(got, parts, b, slots, bounds)
    lora_reference.lora_expand(want, want_t, b.float(), slots, bounds)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    assert torch.equal(got[slots < 0], y[slots < 0])
    assert (got.float() - y.float())[slots >= 0].abs().max() > 0.1


def test_row_tiles_of_base_rows_only_and_many_tiles():
    # 150 rows = three 64-row tiles; the last 60 rows carry no adapter (one whole tile).
    x, a, b, slots = _case(num_tokens=150, k=64, n=40, rank=16, num_slots=4, seed=2)
    slots[90:] = -1
    slots[:64] = torch.arange(64, dtype=torch.int32) % 4   # every slot in the first tile
    parts = lora_kernels.lora_shrink_partials(x, a, slots)
    torch.testing.assert_close(parts.sum(0), lora_reference.lora_shrink(x, a, slots),
                               atol=1e-3, rtol=1e-4)
    y = torch.randn(150, 40)
    got, want = y.clone(), y.clone()
    lora_kernels.lora_expand(got, parts, b, slots)
    lora_reference.lora_expand(want, parts, b, slots)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert torch.equal(got[90:], y[90:]) and not torch.equal(got[:90], y[:90])


def test_launchers_refuse_mismatched_arguments():
    x, a, b, slots = _case()
    with pytest.raises(KernelArgumentError, match="one slot index per token row"):
        lora_kernels.lora_shrink(x, a, slots[:3])
    with pytest.raises(KernelArgumentError, match="input features"):
        lora_kernels.lora_shrink(x[:, :8], a, slots)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):
        lora_kernels.lora_expand(torch.zeros(7, 25), torch.zeros(7, 5), b, slots)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):   # 2 pieces, t of 1
        lora_kernels.lora_expand(torch.zeros(7, 24), torch.zeros(7, 5), b, slots, (0, 8, 24))
    with pytest.raises(KernelArgumentError, match="shapes disagree"):   # bounds not to N
        lora_kernels.lora_expand(torch.zeros(7, 24), torch.zeros(7, 10), b, slots, (0, 8, 20))


def _stacked_gemm(x, w, a):
    """What the stacked layer's GEMM makes: [T, N + S*P*R], base then every slot's shrink."""
    return x @ torch.cat([w, a.reshape(-1, a.shape[2])]).t()


@pytest.mark.parametrize("bounds", [None, (0, 40, 56, 72), (0, 130, 200, 300)])
def test_stacked_expand_reads_each_rows_own_slot_block(bounds):
    # The base GEMM over [W; A of every slot] gives every row every slot's shrink; the expand
    # takes each row's own slot block (rows of the other slots must not leak in), writes
    # base + delta into a fresh tensor, and copies rows without an adapter as they are.
    n = 24 if bounds is None else bounds[-1]
    pieces, rank = (1 if bounds is None else len(bounds) - 1), 6
    x, a, b, slots = _case(num_tokens=9, k=40, n=n, rank=rank, pieces=pieces, seed=5)
    w = torch.randn(n, 40, generator=torch.Generator().manual_seed(6))
    y = _stacked_gemm(x, w, a)
    base, t_all = y[:, :n], y[:, n:]   # strided views of one output, as the layer passes them
    got = lora_kernels.lora_expand_stacked(base, t_all, b, slots, bounds)
    assert got.is_contiguous() and got.shape == (9, n)
    want = x @ w.t()
    lora_reference.lora_expand(want, lora_reference.lora_shrink(x, a, slots), b, slots, bounds)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    ref = lora_reference.lora_expand_stacked(base, t_all, b, slots, bounds)
    torch.testing.assert_close(ref, want, atol=1e-3, rtol=1e-4)
    assert torch.equal(got[slots < 0], base[slots < 0])
    assert torch.equal(base, y[:, :n])   # the GEMM's output is left as it was


def test_stacked_expand_bf16_and_tiles_without_adapter_rows():
    # 150 rows = three 64-row tiles; the last 60 rows carry no adapter (a whole tile copied)
    bounds = (0, 96, 128, 160)
    x, a, b, slots = _case(num_tokens=150, k=64, n=160, rank=16, num_slots=4, seed=7,
                           pieces=3)
    slots[90:] = -1
    slots[:64] = torch.arange(64, dtype=torch.int32) % 4
    w = torch.randn(160, 64, generator=torch.Generator().manual_seed(8)) / 8
    x, w, a, b = x.bfloat16(), w.bfloat16(), (a / 8).bfloat16(), (b / 4).bfloat16()
    y = _stacked_gemm(x.float(), w.float(), a.float()).bfloat16()
    got = lora_kernels.lora_expand_stacked(y[:, :160], y[:, 160:], b, slots, bounds)
    want = lora_reference.lora_expand_stacked(y[:, :160].float(), y[:, 160:].float(),
                                              b.float(), slots, bounds)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=2e-2)
    assert torch.equal(got[90:], y[90:, :160])
    assert (got.float() - y[:, :160].float())[:90].abs().max() > 0.1


def test_stacked_expand_refuses_a_shrink_of_the_wrong_width():
    x, a, b, slots = _case()
    with pytest.raises(KernelArgumentError, match="slots x pieces x rank"):
        lora_kernels.lora_expand_stacked(torch.zeros(7, 24), torch.zeros(7, 14), b, slots)
