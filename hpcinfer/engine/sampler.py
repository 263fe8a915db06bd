"""Sampler: turns the last-position logits of a batch into tokens, vectorised over rows.

Order (as vLLM v1): the structured-outputs bitmask (engine/structured.py) on the rows it
constrains; logprobs from those logits; allowed_token_ids, bad_words, min_tokens
and logit_bias edit the logits; penalties;
greedy rows take argmax; the others are divided by temperature, filtered by min-p, top-k and
top-p, and sampled with the exponential-race trick (argmax of probs / Exp(1) noise), whose
noise comes from the row's own torch.Generator when the request has a seed, so a seeded
request draws the same numbers whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcinfer.engine.outputs import Logprob
from hpcinfer.engine.penalties import PenaltyState
from hpcinfer.engine.sequence import Sequence
from hpcinfer.layers.transfer import to_device


@dataclass
class SamplerOutput:
    token_ids: list[int]                            # one per row
    sampled_logprobs: list[float | None]            # raw logprob of each sampled token
    top_logprobs: list[dict[int, Logprob] | None]   # rows that asked for logprobs


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.penalties: PenaltyState | None = None   # made at the first penalised row

    def make_generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 eos_token_ids: frozenset[int], grammar_mask=None,
                 all_plain: bool = False) -> SamplerOutput:
        # logits: [num_rows, vocab] float32, one row per sequence in seqs. all_plain: the
        # caller knows every row is plain greedy (plain_greedy_params), so no row is looked at.
        if grammar_mask is None and (all_plain or all(_plain_greedy(s) for s in seqs)):
            # The common offline case (every row greedy, nothing to mask or report): one
            # argmax, no copy of the logits, one host sync.
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(seqs),
                                 [None] * len(seqs))
        logits = self._masked(logits, grammar_mask)
        want_logprobs = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_logprobs = (torch.log_softmax(logits[want_logprobs], dim=-1)
                        if want_logprobs else None)
        logits = logits.clone()
        apply_logits_edits(logits, seqs, eos_token_ids)
        self._apply_penalties(logits, seqs)
        token_ids = self._sample(logits, seqs)
        return self._gather_logprobs(token_ids, raw_logprobs, want_logprobs, seqs)

    def sample_tokens(self, logits: torch.Tensor, seqs: list[Sequence],
                      eos_token_ids: frozenset[int], grammar_mask=None,
                      all_plain: bool = False, pending=None) -> torch.Tensor:
        """Tokens only, left on the device: [num_rows] int64 (async scheduling, inflight.py).
        The same computation as __call__ for rows without logprobs. ``pending``: the step in
        flight (inflight.InFlight), whose tokens the penalties count on the device for rows
        that still hold its placeholder."""
        if grammar_mask is None and (all_plain or all(_plain_greedy(s) for s in seqs)):
            return logits.argmax(dim=-1)
        logits = (self._masked(logits, grammar_mask) if grammar_mask is not None
                  else logits.float().clone())
        apply_logits_edits(logits, seqs, eos_token_ids)
        self._apply_penalties(logits, seqs, pending)
        return self._sample(logits, seqs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], pending=None) -> None:
        if not any(s.params.has_penalties for s in seqs):
            return
        if self.penalties is None:
            self.penalties = PenaltyState(logits.shape[1], logits.device)
        apply_penalties_to_rows(logits, seqs, pending, self.penalties)

    @staticmethod
    def _masked(logits: torch.Tensor, grammar_mask) -> torch.Tensor:
        """float32 logits with the grammar bitmask applied (a copy when it is)."""
        logits = logits.float()
        if grammar_mask is not None:
            logits = logits.clone()
            grammar_mask.apply(logits)
        return logits

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if not random_rows:
            return tokens
        params = [seqs[i].params for i in random_rows]
        # (to_device: a pageable copy would wait for the GPU, and under async scheduling this
        # runs while the step's forward is still queued: layers/transfer.py)
        dev = logits.device
        rows = to_device(random_rows, dev)
        sub = logits[rows]
        temperature = to_device([p.temperature for p in params], dev, torch.float32)
        sub = sub / temperature[:, None]
        if any(p.min_p > 0 for p in params):
            sub = apply_min_p(sub, to_device([p.min_p for p in params], dev, torch.float32))
        if any(p.top_k > 0 for p in params) or any(p.top_p < 1 for p in params):
            ks = [p.top_k or self.vocab_size for p in params]
            top_k = to_device(ks, dev, torch.int64)
            top_p = to_device([p.top_p for p in params], dev, torch.float32)
            sub = apply_top_k_top_p(sub, top_k, top_p, max_k=max(ks))
        probs = torch.softmax(sub, dim=-1)
        noise = self._exponential_noise(probs, [seqs[i] for i in random_rows])
        tokens[rows] = (probs / noise).argmax(dim=-1)
        return tokens

    def _exponential_noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
        if len(seeded) < len(seqs):
            noise.exponential_(generator=self.generator)
        for i in seeded:  # one draw per seeded row, from its own stream
            noise[i].exponential_(generator=seqs[i].generator)
        return noise

    def _gather_logprobs(self, tokens: torch.Tensor, raw_logprobs: torch.Tensor | None,
                         want: list[int], seqs: list[Sequence]) -> SamplerOutput:
        token_list = tokens.tolist()
        sampled: list[float | None] = [None] * len(seqs)
        tops: list[dict[int, Logprob] | None] = [None] * len(seqs)
        if raw_logprobs is None:
            return SamplerOutput(token_list, sampled, tops)
        chosen = tokens[want]
        chosen_lp = raw_logprobs.gather(1, chosen[:, None])               # [rows, 1]
        ranks = (raw_logprobs > chosen_lp).sum(dim=-1) + 1                 # 1 = most likely
        max_k = max(seqs[i].params.logprobs for i in want)
        top_lp, top_ids = raw_logprobs.topk(max_k, dim=-1) if max_k else (None, None)
        # read back whole, once each: per row they were a few waits for the GPU a row
        chosen_l, ranks_l = chosen_lp[:, 0].tolist(), ranks.tolist()
        top_lp_l, top_ids_l = (top_lp.tolist(), top_ids.tolist()) if max_k else ([], [])
        for j, i in enumerate(want):
            # vLLM's order: the sampled token first, then the top-k by rank.
            sampled[i] = chosen_l[j]
            entry = {token_list[i]: Logprob(sampled[i], ranks_l[j])}
            k = seqs[i].params.logprobs
            if k:
                for r, (tid, lp) in enumerate(zip(top_ids_l[j][:k], top_lp_l[j][:k])):
                    entry.setdefault(tid, Logprob(lp, r + 1))
            tops[i] = entry
        return SamplerOutput(token_list, sampled, tops)


def _argmax_only(params) -> bool:
    # greedy, nothing to report, nothing that edits the logits (min_tokens aside)
    return (params.is_greedy and params.logprobs is None and not params.has_penalties
            and not params.has_logits_edits)


def _plain_greedy(seq: Sequence) -> bool:
    return _argmax_only(seq.params) and seq.num_output_tokens >= seq.params.min_tokens


def plain_greedy_params(params) -> bool:
    """True if every row with these params takes the plain argmax at every step (no
    min_tokens either, which edits the logits until it is reached)."""
    return _argmax_only(params) and params.min_tokens == 0


# --- logits processors: pure functions, unit-tested against their definitions ---

def apply_logits_edits(logits: torch.Tensor, seqs: list[Sequence],
                       eos_token_ids: frozenset[int]) -> None:
    """vLLM's built-in logits processors, in its order. In place.

    The token lists of all rows go to the device together (one pinned copy and one scatter
    per processor, _scatter): indexing a device row with a Python list copies the list from
    pageable memory, a wait for the GPU per row and step (layers/transfer.py)."""
    allowed = [(i, t) for i, s in enumerate(seqs) if s.params.allowed_token_ids
               for t in s.params.allowed_token_ids]
    if allowed:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        _scatter(keep, allowed, True)
        restricted = to_device([[bool(s.params.allowed_token_ids)] for s in seqs],
                               logits.device)
        logits.masked_fill_(restricted & ~keep, float("-inf"))
    for i, seq in enumerate(seqs):
        if seq.params.bad_words_token_ids:
            apply_bad_words(logits[i], seq.params.bad_words_token_ids, seq.output_token_ids)
    apply_min_tokens(logits, seqs, eos_token_ids)
    bias = [(i, t, b) for i, s in enumerate(seqs) if s.params.logit_bias
            for t, b in s.params.logit_bias.items()]
    if bias:
        values = to_device([b for _, _, b in bias], logits.device, logits.dtype)
        index = to_device([[i for i, _, _ in bias], [t for _, t, _ in bias]], logits.device)
        logits.index_put_((index[0], index[1]), values, accumulate=True)


def _scatter(target: torch.Tensor, pairs: list[tuple[int, int]], value) -> None:
    """target[row, token] = value for every (row, token) pair, in one copy and one launch."""
    index = to_device([[i for i, _ in pairs], [t for _, t in pairs]], target.device)
    target[index[0], index[1]] = value


def apply_bad_words(row: torch.Tensor, bad_words: tuple[tuple[int, ...], ...],
                    output_token_ids: list[int]) -> None:
    """Ban the last token of each bad word whose other tokens end the output so far (a
    one-token word is always banned). row: [vocab], in place."""
    for word in bad_words:
        prefix = list(word[:-1])
        if not prefix or output_token_ids[len(output_token_ids) - len(prefix):] == prefix:
            row[word[-1]] = float("-inf")


def apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence],
                     eos_token_ids: frozenset[int]) -> None:
    """Until a sequence has min_tokens outputs, its stop tokens (and EOS unless ignore_eos)
    cannot be sampled. In place."""
    banned = []
    for i, seq in enumerate(seqs):
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            continue
        tokens = set(params.stop_token_id_set)
        if not params.ignore_eos:
            tokens |= eos_token_ids
        banned += [(i, t) for t in sorted(tokens)]
    if banned:
        _scatter(logits, banned, float("-inf"))


def apply_penalties_to_rows(logits: torch.Tensor, seqs: list[Sequence], pending=None,
                            state: PenaltyState | None = None) -> None:
    """vLLM's presence/frequency/repetition penalties on the rows that ask for them, in place.

    ``state`` (engine/penalties.py) keeps each sequence's prompt mask and output counts on
    the device from call to call and adds only the tokens new since the last one; without
    one, a fresh state builds every row from its ids. Ids outside the logits (a tokenizer's
    added tokens past the model's vocabulary) cannot be sampled and are left out.

    Under async scheduling a row's last output may still be a placeholder (the step in
    flight, ``pending``, has its token on the device): the state counts that token from
    ``pending.tokens``, so the counts are exact without waiting for the token."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return
    vocab, device = logits.shape[1], logits.device
    state = PenaltyState(vocab, device) if state is None else state
    assert state.vocab_size == vocab, (state.vocab_size, vocab)
    chosen = [seqs[i] for i in rows]
    slots = state.update(chosen, pending)
    factors = to_device([[s.params.presence_penalty, s.params.frequency_penalty,
                          s.params.repetition_penalty] for s in chosen], device, torch.float32)
    index = to_device(rows, device)
    if _penalties_in_one_pass(logits):
        # one pass over the rows' logits, counts and mask (kernels/penalties.py); the torch
        # ops below make ~12 passes and gather the state's rows first
        from hpcinfer.kernels.penalties import apply_penalties_
        apply_penalties_(logits, index, slots, state.output_counts, state.prompt_mask,
                         factors)
        return
    logits[index] = apply_penalties(logits[index], state.prompt_mask[slots],
                                    state.output_counts[slots],
                                    factors[:, 0], factors[:, 1], factors[:, 2])


def _penalties_in_one_pass(logits: torch.Tensor) -> bool:
    # The Triton kernel on a GPU, the torch ops elsewhere (tests force the kernel under the
    # interpreter through this function).
    return logits.is_cuda


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor,
                    output_counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties. logits: [B, V]; prompt_mask: [B, V] bool; output_counts: [B, V].

    repetition (tokens in prompt or output): logit / r if logit > 0 else logit * r;
    frequency: logit -= f * count in output; presence: logit -= p * (count in output > 0).
    """
    output_mask = output_counts > 0
    seen = prompt_mask | output_mask
    r = repetition[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * output_counts.to(logits.dtype)
    return logits - presence[:, None] * output_mask.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's. [B, V]."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


# A top_k up to this many (every sampled row of the step having one) takes the candidates
# path: torch.topk of the rows' largest top_k instead of sorting the whole vocabulary.
MAX_TOP_K_CANDIDATES = 1024


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      max_k: int | None = None) -> torch.Tensor:
    """Keep each row's top_k logits, then the smallest set whose probability >= top_p (the
    most likely token always survives). top_k: [B] (vocab = off); top_p: [B] (1 = off).

    ``max_k`` (host int): the largest top_k of the rows. When it is at most
    MAX_TOP_K_CANDIDATES, only each row's ``max_k`` largest logits are sorted (torch.topk)
    and filtered, by the same steps as the whole row: every other logit is below each row's
    k-th, so dropped by top_k anyway. Generation configs set top_k (Qwen2.5 and Qwen3: 20,
    with top_p), and sorting 150k logits a row each step is most of a sampled step. The one
    difference: a logit outside the candidates equal to a row's k-th (a tie at the boundary)
    is kept by the full sort and dropped here; which of tied logits survive top_p was
    already the sort's arbitrary order."""
    vocab = logits.shape[-1]
    if max_k is not None and max_k <= min(MAX_TOP_K_CANDIDATES, vocab - 1):
        values, index = logits.topk(max_k, dim=-1)    # descending
        kept = _top_k_top_p_sorted(values.flip(-1), top_k, top_p)
        return torch.full_like(logits, float("-inf")).scatter_(1, index.flip(-1), kept)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    kept = _top_k_top_p_sorted(sorted_logits, top_k, top_p)
    return torch.empty_like(logits).scatter_(1, order, kept)


def _top_k_top_p_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor) -> torch.Tensor:
    """The filter on rows sorted ascending (the whole vocabulary or a row's largest
    candidates): -inf for what top_k, then top_p, drop."""
    width = sorted_logits.shape[-1]
    kth = sorted_logits.gather(1, (width - top_k.clamp(1, width)).long()[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p[:, None])
    drop[:, -1] = False
    return sorted_logits.masked_fill(drop, float("-inf"))
