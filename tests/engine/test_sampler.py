"""Sampler and logits processors against their definitions; distribution tests with seeds."""
from __future__ import annotations

import math

import pytest
import torch

from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.sampler import (Sampler, apply_min_p, apply_penalties,
                                     apply_penalties_to_rows, apply_top_k_top_p)
from hpcinfer.engine.sequence import Sequence

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
# Chi-square critical values at p = 0.001 (df 1..7): a correct sampler fails 1 run in 1000,
# and the fixed seeds make each run deterministic anyway.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def seq_with(params, prompt=(1, 2), outputs=(), sampler=None):
    seq = Sequence("r", 0, list(prompt), params)
    seq.token_ids += list(outputs)
    if params.seed is not None and sampler is not None:
        seq.generator = sampler.make_generator(params.seed)
    return seq


def test_penalties_follow_vllm_definitions():
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    prompt_mask = torch.zeros(2, V, dtype=torch.bool)
    prompt_mask[0, [1, 2]] = True
    counts = torch.zeros(2, V, dtype=torch.int64)
    counts[0, 2], counts[0, 5], counts[1, 3] = 3, 1, 2
    presence = torch.tensor([0.5, -0.3])
    frequency = torch.tensor([0.2, 1.0])
    repetition = torch.tensor([1.3, 0.7])
    got = apply_penalties(logits, prompt_mask, counts, presence, frequency, repetition)
    want = logits.clone()
    for b in range(2):
        for t in range(V):
            x = logits[b, t].item()
            if prompt_mask[b, t] or counts[b, t] > 0:
                x = x / repetition[b].item() if x > 0 else x * repetition[b].item()
            x -= frequency[b].item() * counts[b, t].item()
            x -= presence[b].item() * (counts[b, t].item() > 0)
            want[b, t] = x
    torch.testing.assert_close(got, want)


def test_penalties_on_rows_use_prompt_and_output_tokens():
    logits = LOGITS.repeat(2, 1)
    plain = seq_with(SamplingParams(temperature=0))
    penalised = seq_with(SamplingParams(temperature=0, repetition_penalty=2.0,
                                        frequency_penalty=0.5, presence_penalty=0.25),
                         prompt=(0,), outputs=(1, 1, 4))
    apply_penalties_to_rows(logits, [plain, penalised])
    torch.testing.assert_close(logits[0], LOGITS)
    want = LOGITS.clone()
    want[0] = 2.0 / 2                        # prompt token: repetition only
    want[1] = 1.5 / 2 - 0.5 * 2 - 0.25        # output twice
    want[4] = 0.0 * 2 - 0.5 - 0.25            # output once (logit 0 -> multiplied)
    torch.testing.assert_close(logits[1], want)


def _penalties_row_by_row(logits, seqs):
    """The definition, one row at a time (the per-row loop the sampler used to run)."""
    out = logits.clone()
    vocab = logits.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        prompt = torch.zeros(1, vocab, dtype=torch.bool)
        counts = torch.zeros(1, vocab, dtype=torch.int64)
        for t in seq.token_ids[:seq.num_prompt_tokens]:
            if t < vocab:
                prompt[0, t] = True
        for t in seq.token_ids[seq.num_prompt_tokens:]:
            counts[0, t] += 1
        out[i] = apply_penalties(logits[i:i + 1], prompt, counts,
                                 torch.tensor([p.presence_penalty]),
                                 torch.tensor([p.frequency_penalty]),
                                 torch.tensor([p.repetition_penalty]))[0]
    return out


def test_penalties_on_many_rows_equal_the_row_by_row_definition():
    gen = torch.Generator().manual_seed(3)
    vocab, seqs = 50, []
    for i in range(12):
        params = (SamplingParams(temperature=0) if i % 4 == 3 else SamplingParams(
            temperature=0, repetition_penalty=1.0 + 0.1 * i, frequency_penalty=0.05 * i,
            presence_penalty=0.3 - 0.05 * i))
        prompt = torch.randint(0, vocab, (1 + 3 * i,), generator=gen).tolist()
        if i == 5:
            prompt.append(vocab + 7)   # an added token past the logits: never penalised
        outputs = torch.randint(0, 8, (i % 5,), generator=gen).tolist()   # repeats
        seqs.append(seq_with(params, prompt=prompt, outputs=outputs))
    logits = torch.randn(len(seqs), vocab, generator=gen)
    want = _penalties_row_by_row(logits, seqs)
    apply_penalties_to_rows(logits, seqs)
    torch.testing.assert_close(logits, want)


def test_logits_edits_on_many_rows_follow_the_row_by_row_definitions():
    """allowed_token_ids, bad words, min_tokens and logit_bias on rows that mix them (all
    rows' token lists go to the device together now), against each definition per row."""
    from hpcinfer.engine.sampler import apply_logits_edits
    gen = torch.Generator().manual_seed(5)
    eos, rows = frozenset({7}), [
        dict(allowed_token_ids=[1, 3, 5], logit_bias={3: 2.5}),
        dict(min_tokens=4, stop_token_ids=[2]),
        dict(min_tokens=4, ignore_eos=True, stop_token_ids=[2, 6]),
        dict(),
        dict(logit_bias={0: -1.0, 6: 0.5}, bad_words=None),
        dict(allowed_token_ids=[0, 7], min_tokens=2),
    ]
    seqs = [seq_with(SamplingParams(temperature=0, **kw), outputs=(4,)) for kw in rows]
    seqs[4].params.bad_words_token_ids = ((4, 5), (6,))   # as the engine fills it from text
    logits = torch.randn(len(seqs), V, generator=gen)
    want = logits.clone()
    inf = float("-inf")
    keep0 = want[0, [1, 3, 5]].clone()
    want[0] = inf
    want[0, [1, 3, 5]] = keep0
    want[0, 3] += 2.5
    want[1, [2, 7]] = inf                 # stop token and EOS until 4 outputs
    want[2, [2, 6]] = inf                 # ignore_eos: the stop tokens only
    want[4, [5, 6]] = inf                 # (4, 5) follows the output 4; (6,) always
    want[4, 0] -= 1.0
    want[4, 6] += 0.5
    keep5 = want[5, [0, 7]].clone()
    want[5] = inf
    want[5, [0, 7]] = keep5
    want[5, 7] = inf                      # min_tokens bans EOS after allowed_token_ids
    apply_logits_edits(logits, seqs, eos)
    torch.testing.assert_close(logits, want)


def test_min_p_and_top_k_top_p_masks():
    probs = torch.softmax(LOGITS, -1)
    kept = apply_min_p(LOGITS[None], torch.tensor([0.3]))[0] > -math.inf
    assert kept.tolist() == (probs >= 0.3 * probs.max()).tolist()
    topk = apply_top_k_top_p(LOGITS[None], torch.tensor([3]), torch.tensor([1.0]))[0]
    assert (topk > -math.inf).tolist() == [True] * 3 + [False] * 5
    torch.testing.assert_close(topk[:3], LOGITS[:3])
    # top_p: the smallest set of most likely tokens whose mass reaches p
    cum = probs.cumsum(0)
    p = float(cum[2]) + 1e-3                  # needs 4 tokens
    topp = apply_top_k_top_p(LOGITS[None], torch.tensor([V]), torch.tensor([p]))[0]
    assert (topp > -math.inf).tolist() == [True] * 4 + [False] * 4
    tiny_p = apply_top_k_top_p(LOGITS[None], torch.tensor([V]), torch.tensor([1e-6]))[0]
    assert (tiny_p > -math.inf).sum() == 1    # the top token always survives


def test_top_k_candidates_filter_as_the_whole_sorted_row(monkeypatch):
    # Rows with a top_k (here up to 40, some with top_p too, some without) sort only their
    # largest max_k logits (torch.topk): the same kept logits as sorting all 500, and no
    # full sort at all (the candidates path would otherwise be a no-op).
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 500, generator=gen) * 3
    top_k = torch.randint(1, 41, (64,), generator=gen)
    top_p = torch.where(torch.arange(64) % 3 == 0, torch.tensor(1.0),
                        torch.rand(64, generator=gen) * 0.9 + 0.05)
    whole = apply_top_k_top_p(logits, top_k, top_p)
    sort = torch.Tensor.sort

    def no_sort(*args, **kwargs):
        raise AssertionError("the candidates path sorted the whole row")
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    got = apply_top_k_top_p(logits, top_k, top_p, max_k=int(top_k.max()))
    monkeypatch.setattr(torch.Tensor, "sort", sort)
    assert torch.equal(got, whole)
    assert ((got > -math.inf).sum(-1) <= top_k).all()
    assert ((got > -math.inf).sum(-1)[top_p == 1] == top_k[top_p == 1]).all()
    # rows without a top_k (max_k = vocab) or past MAX_TOP_K_CANDIDATES sort the whole row
    from hpcinfer.engine import sampler as sampler_module
    monkeypatch.setattr(sampler_module, "MAX_TOP_K_CANDIDATES", 8)
    assert torch.equal(apply_top_k_top_p(logits, top_k, top_p, max_k=40), whole)


def test_seeded_top_k_top_p_samples_as_with_the_whole_sort(monkeypatch):
    # The candidates path changes which logits are sorted, not the noise: a seeded row
    # draws the same tokens as with the whole vocabulary sorted (Qwen-style top_k=20 with
    # top_p, the generation configs that made every step sort the vocabulary).
    from hpcinfer.engine import sampler as sampler_module

    def draw(max_candidates):
        monkeypatch.setattr(sampler_module, "MAX_TOP_K_CANDIDATES", max_candidates)
        sampler = Sampler(300, torch.device("cpu"), seed=7)
        gen = torch.Generator().manual_seed(11)
        seqs = [seq_with(SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=i),
                         sampler=sampler) for i in range(6)]
        seqs += [seq_with(SamplingParams(temperature=1.0, top_k=5), sampler=sampler)]
        return [sampler(torch.randn(7, 300, generator=gen) * 2, seqs, frozenset()).token_ids
                for _ in range(20)]
    assert draw(1024) == draw(0)


def expected_distribution(params: SamplingParams) -> torch.Tensor:
    logits = LOGITS / params.temperature
    probs = torch.softmax(logits, -1)
    keep = torch.ones(V, dtype=torch.bool)
    if params.min_p:
        keep &= probs >= params.min_p * probs.max()
    if params.top_k:
        keep &= torch.arange(V) < params.top_k  # LOGITS are sorted descending
    masked = torch.where(keep, logits, torch.tensor(-math.inf))
    if params.top_p < 1:
        p = torch.softmax(masked, -1)
        cum_before = p.cumsum(0) - p
        keep &= cum_before < params.top_p
    return torch.softmax(torch.where(keep, logits, torch.tensor(-math.inf)), -1)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.5, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
], ids=["t1", "t0.5", "topk", "topp", "minp", "all"])
def test_chi_square_sampling_distribution(params):
    num_samples = 4000
    sampler = Sampler(V, torch.device("cpu"), seed=1234)
    seqs = [seq_with(params) for _ in range(num_samples)]
    tokens = sampler(LOGITS.repeat(num_samples, 1), seqs, frozenset()).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=V).double()
    expected = expected_distribution(params).double() * num_samples
    support = expected > 0
    assert observed[~support].sum() == 0, "sampled a token the filters remove"
    chi2 = (((observed - expected) ** 2)[support] / expected[support]).sum().item()
    df = int(support.sum()) - 1
    assert df >= 1 and chi2 < CHI2_CRIT[df], f"chi2={chi2:.2f} df={df}"


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def draw(batch_extra: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(50, torch.device("cpu"), seed=sampler_seed)
        seq = seq_with(params, sampler=sampler)
        others = [seq_with(SamplingParams(temperature=1.0, seed=s), sampler=sampler)
                  for s in range(batch_extra)]
        others += [seq_with(SamplingParams(temperature=0.7)) for _ in range(batch_extra)]
        tokens = []
        for _ in range(20):
            batch = others[:batch_extra] + [seq] + others[batch_extra:]
            out = sampler(logits.repeat(len(batch), 1), batch, frozenset())
            tokens.append(out.token_ids[batch_extra])
        return tokens

    alone = draw(0, 0)
    assert alone == draw(3, 7) == draw(9, 1)
    assert len(set(alone)) > 1  # really sampling, not argmax


def test_top_k_1_is_greedy_and_greedy_is_argmax():
    sampler = Sampler(V, torch.device("cpu"))
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(3))
    greedy = sampler(logits, [seq_with(SamplingParams(temperature=0)) for _ in range(16)],
                     frozenset()).token_ids
    topk1 = sampler(logits, [seq_with(SamplingParams(temperature=1.3, top_k=1))
                             for _ in range(16)], frozenset()).token_ids
    assert greedy == topk1 == logits.argmax(-1).tolist()


def test_min_tokens_blocks_stop_and_eos_tokens():
    sampler = Sampler(V, torch.device("cpu"))
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    eos = frozenset({0})
    young = seq_with(params, outputs=(5,))
    old = seq_with(params, outputs=(5, 5))
    out = sampler(LOGITS.repeat(2, 1), [young, old], eos)
    assert out.token_ids == [2, 0]          # young skips EOS (0) and stop token (1)
    ignore = seq_with(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True))
    assert sampler(LOGITS[None], [ignore], eos).token_ids == [0]


def test_logprobs_are_raw_log_softmax_with_ranks():
    sampler = Sampler(V, torch.device("cpu"))
    seqs = [seq_with(SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.5),
                     prompt=(5,), outputs=(0,)),
            seq_with(SamplingParams(temperature=0)),
            seq_with(SamplingParams(temperature=0, logprobs=0, top_k=1))]
    out = sampler(LOGITS.repeat(3, 1), seqs, frozenset())
    raw = torch.log_softmax(LOGITS, -1)
    # Row 0: penalty makes token 1 the argmax, yet logprobs are of the raw logits.
    assert out.token_ids[0] == 1
    top = out.top_logprobs[0]
    assert list(top) == [1, 0, 2]            # sampled first, then the top-k (vLLM's order)
    assert [top[t].rank for t in (0, 1, 2)] == [1, 2, 3]
    assert abs(top[1].logprob - raw[1].item()) < 1e-6
    assert abs(out.sampled_logprobs[0] - raw[1].item()) < 1e-6
    assert out.top_logprobs[1] is None and out.sampled_logprobs[1] is None
    assert list(out.top_logprobs[2]) == [0] and out.top_logprobs[2][0].rank == 1
