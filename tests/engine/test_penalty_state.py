"""PenaltyState (engine/penalties.py): the incremental device counts give exactly the logits of
the full rebuild from every row's host ids that the sampler ran at every step before.

The rebuild is kept below as the reference (``_rebuilt``). Steps are simulated as the engine
runs them (llm_engine.py): synchronous steps append the sampled tokens; async steps leave a
placeholder whose token is in the step in flight (``pending``), filled when the next step
reads it back, or dropped from a sequence that finished (abort) meanwhile.
"""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcinfer.engine import penalties
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.penalties import PenaltyState
from hpcinfer.engine.sampler import Sampler, apply_penalties, apply_penalties_to_rows
from hpcinfer.engine.sequence import Sequence, SequenceStatus

VOCAB = 40


def _rebuilt(logits: torch.Tensor, seqs: list[Sequence], pending=None) -> torch.Tensor:
    """The sampler's penalties before PenaltyState (2026-12-04): mask and counts rebuilt
    from all host ids of every penalised row, the in-flight token added from ``pending``."""
    logits = logits.clone()
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return logits
    vocab = logits.shape[1]
    chosen = [seqs[i] for i in rows]
    prompt_lens = [s.num_prompt_tokens for s in chosen]
    out_lens = [len(s.token_ids) - s.num_prompt_tokens for s in chosen]
    ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in chosen), np.int64,
                      sum(prompt_lens) + sum(out_lens))
    pieces = [n for pair in zip(prompt_lens, out_lens) for n in pair]
    which = np.repeat(np.arange(2 * len(rows)) // 2, pieces)
    is_output = np.repeat(np.arange(2 * len(rows)) % 2, pieces)
    keep = (ids >= 0) & (ids < vocab)
    which, ids, is_output = (torch.as_tensor(x[keep]) for x in (which, ids, is_output))
    is_output = is_output == 1
    prompt_mask = torch.zeros(len(rows), vocab, dtype=torch.bool)
    prompt_mask[which[~is_output], ids[~is_output]] = True
    output_counts = torch.zeros(len(rows), vocab, dtype=torch.int32)
    output_counts.index_put_((which[is_output], ids[is_output]),
                             torch.ones(int(is_output.sum()), dtype=torch.int32),
                             accumulate=True)
    if pending is not None:
        for j, s in enumerate(chosen):
            if s.has_placeholder:
                output_counts[j, pending.tokens[pending.index[id(s)]]] += 1
    factors = torch.tensor([[s.params.presence_penalty, s.params.frequency_penalty,
                             s.params.repetition_penalty] for s in chosen])
    logits[rows] = apply_penalties(logits[rows], prompt_mask, output_counts,
                                   factors[:, 0], factors[:, 1], factors[:, 2])
    return logits


def _pending(seqs: list[Sequence], tokens: list[int]):
    """A stand-in for inflight.InFlight: the launched step's rows and tokens."""
    return SimpleNamespace(seqs=seqs, tokens=torch.tensor(tokens, dtype=torch.int64),
                           token_list=list(tokens), index={id(s): i for i, s in enumerate(seqs)})


def _seq(rng: random.Random, i: int, penalised: bool = True) -> Sequence:
    params = (SamplingParams(temperature=0, repetition_penalty=1.0 + 0.1 * (i % 5 + 1),
                             frequency_penalty=0.05 * (i % 4), presence_penalty=0.3 - 0.1 * (i % 3))
              if penalised else SamplingParams(temperature=0))
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    if i % 3 == 0:
        prompt.append(VOCAB + i)   # an added token past the logits: never penalised
    return Sequence(str(i), 0, prompt, params)


def _check(state: PenaltyState, seqs: list[Sequence], pending, gen: torch.Generator) -> None:
    logits = torch.randn(len(seqs), VOCAB, generator=gen)
    want = _rebuilt(logits, seqs, pending)
    got = logits.clone()
    apply_penalties_to_rows(got, seqs, pending, state)
    assert torch.equal(got, want)


def _resolve(pending, rng: random.Random, alive: list[Sequence]) -> None:
    """Read back the step in flight as the engine does: fill each placeholder with its real
    token, except for sequences aborted meanwhile (token dropped, never sampled again)."""
    for seq, token in zip(pending.seqs, pending.token_list):
        if seq.is_finished or rng.random() < 0.03:   # aborted: placeholder dropped
            seq.drop_placeholder()
            seq.status = SequenceStatus.FINISHED
            if seq in alive:
                alive.remove(seq)
            continue
        seq.drop_placeholder()
        seq.token_ids.append(token)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_state_equals_the_full_rebuild_over_many_steps(seed, monkeypatch):
    """Rows join, leave and come back; more sequences than rows (reclaimed, rebuilt); async
    steps with placeholders mixed with synchronous ones; ids past the vocabulary."""
    monkeypatch.setattr(penalties, "CAPACITY_STEP", 4)   # reclaim and growth at small sizes
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    pool = [_seq(rng, i, penalised=i % 7 != 6) for i in range(30)]
    alive, state, pending, seen = list(pool[:10]), PenaltyState(VOCAB, "cpu"), None, set()
    for step in range(120):
        if len(alive) < 10 and len(pool) > len(seen | {s.seq_id for s in alive}):
            alive += [s for s in pool if s.seq_id not in seen and s not in alive][:2]
        # rows with a placeholder must be sampled (the scheduler gives them their row)
        must = [s for s in alive if s.has_placeholder]
        rest = [s for s in alive if not s.has_placeholder and rng.random() < 0.6]
        rows = must + rest
        rng.shuffle(rows)
        if not rows:
            continue
        seen |= {s.seq_id for s in rows}
        _check(state, rows, pending, gen)
        tokens = [rng.randrange(VOCAB + 3) if rng.random() < 0.1 else rng.randrange(8)
                  for _ in rows]   # repeats, and now and then an id past the vocabulary
        if pending is not None:
            _resolve(pending, rng, alive)
        rows = [s for s in rows if not s.is_finished]
        tokens = tokens[:len(rows)]
        if rng.random() < 0.7:   # async step: placeholders, tokens on the "device"
            pending = _pending(rows, [t % VOCAB for t in tokens])   # (sampled: in the logits)
            for s in rows:
                s.add_placeholder()
        else:
            pending = None
            for s, t in zip(rows, tokens):
                s.token_ids.append(t)
        for s in [s for s in alive if s.num_output_tokens > 25 and not s.has_placeholder]:
            alive.remove(s)   # finished by length: leaves for good
    assert state.capacity < len(seen), "no row was ever reclaimed"


def test_a_reclaimed_row_is_rebuilt_when_its_sequence_comes_back(monkeypatch):
    monkeypatch.setattr(penalties, "CAPACITY_STEP", 2)
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    a, b, c, d = (_seq(rng, i) for i in range(4))
    state = PenaltyState(VOCAB, "cpu")
    _check(state, [a, b], None, gen)
    a.token_ids += [3, 3, 5]
    _check(state, [c, d], None, gen)   # no free row: a's and b's are reclaimed
    assert state.capacity == 2
    a.token_ids += [VOCAB + 1, 3]
    _check(state, [a, c], None, gen)   # a comes back: built again from its host ids


def test_placeholder_token_is_not_counted_again_once_filled():
    """The in-flight token is counted from ``pending`` on the device; when the host later
    puts the same token in the placeholder's place, it must not be counted a second time."""
    gen = torch.Generator().manual_seed(1)
    seq = Sequence("r", 0, [1, 2], SamplingParams(temperature=0, frequency_penalty=1.0))
    seq.token_ids += [7]
    state = PenaltyState(VOCAB, "cpu")
    _check(state, [seq], None, gen)
    seq.add_placeholder()
    pending = _pending([seq], [9])
    _check(state, [seq], pending, gen)
    seq.drop_placeholder()
    seq.token_ids.append(9)            # the host reads the token back
    _check(state, [seq], None, gen)
    row = state.update([seq])[0]
    assert state.output_counts[row, 9].item() == 1
    assert state.output_counts[row, 7].item() == 1


def test_outputs_shorter_than_counted_rebuild_the_row():
    """An aborted sequence's placeholder is dropped after its token was counted; it is never
    sampled again, but if it were, its row is rebuilt instead of keeping that count."""
    gen = torch.Generator().manual_seed(2)
    seq = Sequence("r", 0, [4, 5], SamplingParams(temperature=0, presence_penalty=0.5))
    state = PenaltyState(VOCAB, "cpu")
    seq.add_placeholder()
    _check(state, [seq], _pending([seq], [11]), gen)
    seq.drop_placeholder()              # token 11 dropped: the sequence never had it
    _check(state, [seq], None, gen)


def test_sampler_makes_the_state_at_the_first_penalised_row_and_keeps_it():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    plain = Sequence("p", 0, [1, 2, 3], SamplingParams(temperature=0, logit_bias={1: 1.0}))
    sampler(torch.randn(1, VOCAB), [plain], frozenset())
    sampler.sample_tokens(torch.randn(1, VOCAB), [plain], frozenset())
    assert sampler.penalties is None   # nothing allocated for runs without penalties
    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(temperature=0, repetition_penalty=1.5))
    sampler(torch.randn(2, VOCAB), [plain, seq], frozenset())
    state = sampler.penalties
    assert state is not None and state.capacity == penalties.CAPACITY_STEP
    seq.token_ids.append(5)
    seq.add_placeholder()
    sampler.sample_tokens(torch.randn(2, VOCAB), [seq, plain], frozenset(),
                          pending=_pending([seq], [6]))
    assert sampler.penalties is state
    row = state.update([seq])[0]
    assert state.output_counts[row].tolist() == [int(t in (5, 6)) for t in range(VOCAB)]


def test_seq_ids_are_unique_for_each_sequence_of_a_request():
    params = SamplingParams(temperature=0.5, n=3)
    seqs = [Sequence("same", i, [1], params.child(i)) for i in range(3)]
    again = Sequence("same", 0, [1], params)   # a request id used again after it finished
    assert len({s.seq_id for s in seqs + [again]}) == 4
