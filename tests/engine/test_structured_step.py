"""The host side of a structured-outputs step (engine/structured.py): the matchers accept a
step's tokens and fill the next masks in one xgrammar call per chunk of rows, the chunks on
several threads (engine/grammar_threads.py). Each path must give what one matcher at a time
gives: the same accept results, finish reasons and masks.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.engine.inflight import InFlight
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.sequence import Sequence
from hpcinfer.engine.structured import StructuredOutputs
from hpcinfer.engine.token_appender import TokenAppender
from hpcinfer.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object",
          "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                  "minItems": 1, "maxItems": 2},
                         "ok": {"type": "boolean"}},
          "required": ["tags", "ok"], "additionalProperties": False}
CONSTRAINTS = [StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
               StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
               StructuredOutputsParams(regex=r"[a-c]{1,3}-[0-9]")]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), max_model_len=512)


@pytest.fixture()
def stage(llm):
    tokenizer = llm.get_tokenizer()
    return StructuredOutputs(tokenizer, llm.llm_engine.spec.vocab_size,
                             {tokenizer.eos_token_id}, torch.device("cpu"), max_threads=2)


def _rows(stage, count: int, max_tokens: int = 100) -> list[Sequence]:
    seqs = []
    for i in range(count):
        seq = Sequence(str(i), 0, [5, 6, 7], SamplingParams(max_tokens=max_tokens))
        stage.start(seq, stage.compile(CONSTRAINTS[i % len(CONSTRAINTS)]))
        seqs.append(seq)
    return seqs


def _allowed(matcher, num_words: int) -> list[int]:
    if matcher.is_terminated():   # (xgrammar refuses to fill an ended matcher)
        return []
    mask = torch.zeros((1, num_words), dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask, 0)
    return [32 * w + b for w, word in enumerate(mask[0].tolist()) for b in range(32)
            if (word >> b) & 1]


def _walk_tokens(seqs, stage, rng) -> list[int]:
    """Mostly tokens the grammar allows (EOS among them where the grammar may end), now and
    then one it refuses."""
    tokens = []
    for seq in seqs:
        allowed = _allowed(seq.grammar, stage._num_words) or [3]
        tokens.append(rng.randrange(stage.mask_vocab) if rng.random() < 0.15
                      else rng.choice(allowed))
    return tokens


def test_batch_accept_equals_one_matcher_at_a_time(stage, monkeypatch):
    """(accepted, ended) of the batched accepts, in chunks on two threads, equal accept_token
    and is_terminated called per matcher, through ended grammars and refused tokens."""
    from hpcinfer.engine import structured
    monkeypatch.setattr(structured, "ROWS_PER_ACCEPT_CHUNK", 2)   # chunks of a few rows
    rng = random.Random(0)
    batched, single = _rows(stage, 9), _rows(stage, 9)
    num_ended = num_refused = 0
    for _ in range(40):
        tokens = _walk_tokens(single, stage, rng)
        got = stage._accept_batch(batched, tokens, [0] * len(tokens))
        want = []
        for seq, token in zip(single, tokens):
            ok = seq.grammar.accept_token(token)
            want.append((ok, seq.grammar.is_terminated()))
        assert got == want
        assert [s.grammar.is_terminated() for s in batched] == [w[1] for w in want]
        num_ended += sum(ended for _, ended in want)
        num_refused += sum(not ok for ok, _ in want)
    assert num_ended and num_refused and stage._threads._pool is not None


def test_finish_reasons_through_accept_tokens(stage, caplog):
    """The engine's path (accept_tokens, then accept per row as the appender calls it): a
    refused token aborts its row with the warning, the stop token ends a complete grammar
    with "stop", and a row's grammar that ended refuses the next token with "stop"."""
    eos = next(iter(stage._stop_ids))
    seqs = [_choice_row(stage, "yes", i) for i in range(3)]
    for seq in seqs[1:]:
        assert seq.grammar.accept_string("yes")
    assert seqs[2].grammar.accept_token(eos) and seqs[2].grammar.is_terminated()
    refused = _allowed_complement(seqs[0].grammar, stage)
    tokens = [refused, eos, 9]
    stage.accept_tokens(seqs, tokens)
    with caplog.at_level(logging.WARNING, logger="hpcinfer.engine.structured"):
        reasons = []
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
            reasons.append(stage.accept(seq, token))
    assert reasons == ["abort", "stop", "stop"]
    assert [r.message for r in caplog.records if "outside" in r.message] == [
        f"request '0': token {refused} is outside its structured-outputs constraint (no "
        "allowed token was left after the other logits edits); the sequence is aborted"]


def _choice_row(stage, choice: str, index: int) -> Sequence:
    seq = Sequence(str(index), 0, [5], SamplingParams(max_tokens=10))
    stage.start(seq, stage.compile(StructuredOutputsParams(choice=[choice])))
    return seq


def _allowed_complement(matcher, stage) -> int:
    allowed = set(_allowed(matcher, stage._num_words))
    return next(t for t in range(10, stage.mask_vocab) if t not in allowed)


def test_fill_follows_the_batch_rows(llm, stage):
    """Async steps as the engine runs them (tokens read back, accepted, appended, then the
    next batch's masks): fill takes the rows in whatever order the next batch has them, a row
    that was not in the last step, and leaves out rows that finished meanwhile (two by
    length). Every mask row equals the matcher's own fill, for the batch row it names."""
    appender = TokenAppender(llm.get_tokenizer(), 10 ** 6, frozenset(stage._stop_ids))
    rng = random.Random(1)
    seqs = _rows(stage, 10) + _rows(stage, 2, max_tokens=3)   # two rows end by length
    for seq in seqs:
        seq.detok = _NoText()
    stage.fill(seqs)   # the first step: buffers
    tokens = _walk_tokens(seqs, stage, random.Random(2))
    num_steps = 0
    for step in range(8):
        live = [s for s in seqs if not s.is_finished]
        flight = InFlight.launch(live, torch.tensor([tokens[seqs.index(s)] for s in live]),
                                 None)
        flight_tokens = flight.token_list()
        stage.accept_tokens(live, flight_tokens)
        for seq, token in zip(live, flight_tokens):
            appender.append(seq, token, None, None, stage)
        newcomer = _rows(stage, 1)[0]
        batch = [s for s in reversed(live)] + [newcomer]   # another row order, a new row
        mask = stage.fill(batch)
        constrained = [s for s in batch if not s.is_finished and not s.grammar.is_terminated()]
        if not constrained:
            break
        num_steps += 1
        rows = mask.rows.tolist() if mask.rows is not None else list(range(len(batch)))
        assert [batch[i] for i in rows] == constrained
        for k, seq in enumerate(constrained):
            want = torch.zeros((1, stage._num_words), dtype=torch.int32)
            seq.grammar.fill_next_token_bitmask(want, 0)
            assert torch.equal(mask.bitmask[k], want[0]), (step, k)
        tokens = [rng.choice(_allowed(s.grammar, stage._num_words) or [3]) for s in seqs]
    assert num_steps >= 3
    assert sum(s.finish_reason == "length" for s in seqs) == 2


class _NoText:
    output_text = ""

    def append(self, token_id):
        return ""

    def defer(self, token_id):
        pass

    def flush(self):
        pass


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_calls_give_the_same_outputs(checkpoint, monkeypatch, async_scheduling):
    """Many constrained rows with their accepts and fills in chunks on three threads give
    the outputs of one thread on the step loop."""
    from hpcinfer.engine import structured
    prompts = [f"Row {i} says" for i in range(12)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=120,
                             structured_outputs=CONSTRAINTS[i % len(CONSTRAINTS)])
              for i in range(12)]
    llm = LLM(checkpoint("llama"), max_model_len=512, async_scheduling=async_scheduling)
    monkeypatch.setattr(structured, "ROWS_PER_ACCEPT_CHUNK", 10 ** 6)
    monkeypatch.setattr(structured, "MIN_FILL_CHUNK_ROWS", 10 ** 6)
    plain = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
             for o in llm.generate(prompts, params, use_tqdm=False)]
    stage = llm.llm_engine.structured
    assert stage._threads._pool is None   # one thread so far
    monkeypatch.setattr(structured, "ROWS_PER_ACCEPT_CHUNK", 2)
    monkeypatch.setattr(structured, "MIN_FILL_CHUNK_ROWS", 2)
    monkeypatch.setattr(structured, "FILL_CHUNK_S", 1e-9)
    monkeypatch.setattr(stage._threads, "max_threads", 3)
    monkeypatch.setattr(stage, "_fillers", [stage._fillers[0].__class__(1) for _ in range(3)])
    fast = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in llm.generate(prompts, params, use_tqdm=False)]
    assert fast == plain
    assert all(reason == "stop" for _, reason in plain)
    assert stage._threads._pool is not None


def test_chunked_fills_equal_one_matcher_at_a_time(stage, monkeypatch):
    """80 rows filled in chunks on two threads, dealt round-robin, the chunk size following
    the measured cost per row: every mask row equals the matcher's own fill."""
    from hpcinfer.engine import structured
    monkeypatch.setattr(structured, "MIN_FILL_CHUNK_ROWS", 4)
    rng = random.Random(3)
    seqs = _rows(stage, 80, max_tokens=10 ** 6)
    for step in range(20):
        live = [s for s in seqs if not s.grammar.is_terminated()]
        mask = stage.fill(live)
        for k, seq in enumerate(live):
            want = torch.zeros((1, stage._num_words), dtype=torch.int32)
            seq.grammar.fill_next_token_bitmask(want, 0)
            assert torch.equal(mask.bitmask[k], want[0]), (step, k)
        for seq in live:
            seq.grammar.accept_token(rng.choice(_allowed(seq.grammar, stage._num_words)))
    assert stage._threads._pool is not None and 0 < stage.fill_row_s < 1e-2


def test_deal_and_undeal_are_inverse():
    from hpcinfer.engine.grammar_threads import ChunkRunner, deal, undeal
    items = list(range(11))
    for n in (1, 2, 3, 11):
        parts = [deal(items, n, j) for j in range(n)]
        assert sorted(x for p in parts for x in p) == items
        assert undeal(parts, len(items)) == items
    runner = ChunkRunner(4, "test")
    assert runner.chunks(100, 32) == 3 and runner.chunks(5, 32) == 1
    assert runner.chunks(999, 1) == 4
    assert runner.map(lambda j: j * j, 3) == [0, 1, 4]
