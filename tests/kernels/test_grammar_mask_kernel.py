"""kernels/grammar_mask.py (TRITON_INTERPRET=1, tests/conftest.py) against its torch reference:
constrained rows in any order of the logits or every row, a bitmask narrower than the logits
(tokens past the tokenizer get -inf), wider (the tokenizer past the logits), words with the
sign bit set, and rows not constrained left as they are."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels.grammar_mask import (BLOCK, apply_grammar_mask_,
                                           apply_grammar_mask_reference)
from hpcinfer.kernels.launch_checks import KernelArgumentError


def _bitmask(rows: int, mask_vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = (mask_vocab + 31) // 32
    bitmask = torch.randint(-(1 << 31), (1 << 31) - 1, (rows, words), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    bitmask[0, :3] = -1   # every token allowed in a few words, none in others
    bitmask[0, 3:5] = 0
    return bitmask


@pytest.mark.parametrize("vocab,mask_vocab", [(BLOCK + 300, BLOCK + 300),   # as wide
                                              (BLOCK + 300, 3000),          # logits wider
                                              (1000, 1100)])                # tokenizer wider
@pytest.mark.parametrize("with_rows", [True, False])
def test_kernel_equals_the_reference(vocab, mask_vocab, with_rows):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, vocab, generator=gen)
    rows = torch.tensor([5, 0, 3, 6]) if with_rows else None
    bitmask = _bitmask(4 if with_rows else 7, mask_vocab, seed=2)
    want, got = logits.clone(), logits.clone()
    apply_grammar_mask_reference(want, rows, bitmask, mask_vocab)
    apply_grammar_mask_(got, rows, bitmask, mask_vocab)
    assert torch.equal(got, want)
    if with_rows:
        assert torch.equal(got[[1, 2, 4]], logits[[1, 2, 4]])   # free rows untouched
    assert torch.isinf(got).any() and torch.isfinite(got[rows[0] if with_rows else 0, :96]).all()
    if mask_vocab < vocab:
        assert torch.isinf(got[rows if with_rows else slice(None), mask_vocab:]).all()


def test_bad_arguments_say_what_to_change():
    logits = torch.randn(3, 100)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):
        apply_grammar_mask_(logits, torch.tensor([0, 1]), torch.zeros(3, 4, dtype=torch.int32),
                            100)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):   # 2 words: 64 tokens
        apply_grammar_mask_(logits, None, torch.zeros(3, 2, dtype=torch.int32), 100)
    with pytest.raises(KernelArgumentError):
        apply_grammar_mask_(logits, None, torch.zeros(3, 4, dtype=torch.int64), 100)
    before = logits.clone()
    apply_grammar_mask_(logits, torch.tensor([], dtype=torch.long),
                        torch.zeros(0, 4, dtype=torch.int32), 100)
    assert torch.equal(logits, before)
