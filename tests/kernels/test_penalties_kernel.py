"""kernels/penalties.py (TRITON_INTERPRET=1, tests/conftest.py) against the sampler's torch
penalties on the same rows: penalised rows in any order of the logits, state rows in any
order, prompt-only, output-only and both, counts above 1, logits of both signs, and rows of
the logits that are not penalised left as they are."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.engine.sampler import apply_penalties
from hpcinfer.kernels.launch_checks import KernelArgumentError
from hpcinfer.kernels.penalties import BLOCK, apply_penalties_


def _case(num_logit_rows=7, num_state_rows=9, vocab=BLOCK + 300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_logit_rows, vocab, generator=gen) * 3
    counts = torch.randint(0, 4, (num_state_rows, vocab), generator=gen, dtype=torch.int32)
    counts[counts < 3] = 0                                  # most tokens not in the output
    prompt = torch.rand(num_state_rows, vocab, generator=gen) < 0.2
    rows = torch.tensor([5, 0, 3, 6])                       # penalised rows of the logits
    slots = torch.tensor([8, 2, 0, 5], dtype=torch.int32)   # their rows in the state
    factors = torch.tensor([[0.5, 0.2, 1.3], [-0.3, 1.0, 0.7], [0.0, 0.0, 1.0],
                            [1.5, -0.5, 2.0]])
    return logits, rows, slots, counts, prompt, factors


def test_kernel_equals_the_torch_penalties_on_the_same_rows():
    logits, rows, slots, counts, prompt, factors = _case()
    want = logits.clone()
    want[rows] = apply_penalties(logits[rows], prompt[slots.long()], counts[slots.long()],
                                 factors[:, 0], factors[:, 1], factors[:, 2])
    got = logits.clone()
    apply_penalties_(got, rows, slots, counts, prompt, factors)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    untouched = [1, 2, 4]
    assert torch.equal(got[untouched], logits[untouched])
    assert not torch.equal(got[rows], logits[rows])


def test_no_rows_and_bad_arguments():
    logits, rows, slots, counts, prompt, factors = _case()
    before = logits.clone()
    apply_penalties_(logits, rows[:0], slots[:0], counts, prompt, factors[:0])
    assert torch.equal(logits, before)
    with pytest.raises(KernelArgumentError, match="shapes disagree"):
        apply_penalties_(logits, rows, slots[:3], counts, prompt, factors)
    with pytest.raises(KernelArgumentError):
        apply_penalties_(logits, rows, slots, counts.long(), prompt, factors)


def test_sampler_rows_through_the_kernel_equal_the_torch_path(monkeypatch):
    # apply_penalties_to_rows as it runs on a GPU (state rows, the kernel in place), forced
    # here under the interpreter, against its torch path: same logits, rows without
    # penalties untouched, over steps that add output tokens.
    from hpcinfer.engine import sampler
    from hpcinfer.engine.params import SamplingParams
    from hpcinfer.engine.penalties import PenaltyState
    from hpcinfer.engine.sequence import Sequence
    vocab = 300
    gen = torch.Generator().manual_seed(1)
    seqs = [Sequence(str(i), 0, torch.randint(0, vocab, (5 + i,), generator=gen).tolist(),
                     SamplingParams(temperature=0, repetition_penalty=1.2 + 0.1 * i,
                                    presence_penalty=0.3, frequency_penalty=0.1 * i)
                     if i != 2 else SamplingParams(temperature=0)) for i in range(5)]
    states = {True: PenaltyState(vocab, "cpu"), False: PenaltyState(vocab, "cpu")}
    for _ in range(4):
        logits = torch.randn(5, vocab, generator=gen)
        got = {}
        for kernel in (True, False):
            monkeypatch.setattr(sampler, "_penalties_in_one_pass", lambda _, k=kernel: k)
            got[kernel] = logits.clone()
            sampler.apply_penalties_to_rows(got[kernel], seqs, state=states[kernel])
        torch.testing.assert_close(got[True], got[False], atol=0, rtol=1e-6)
        assert torch.equal(got[True][2], logits[2])
        assert not torch.equal(got[True][0], logits[0])
        for seq in seqs:
            seq.token_ids.append(int(torch.randint(0, vocab, (1,), generator=gen)))
