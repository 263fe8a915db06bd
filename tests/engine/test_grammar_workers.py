"""Grammar matchers in worker processes (engine/grammar_workers.py) must give exactly what
matchers in the engine's process give: the same accept results, finish reasons and masks,
through new rows, finished rows whose slots are reused, and a staging buffer that grows; the
engine's outputs must not change; a worker that dies stops the engine with a clear error."""
from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.engine import grammar_workers
from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.sequence import Sequence, SequenceStatus
from hpcinfer.engine.structured import StructuredOutputs
from hpcinfer.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object",
          "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                  "minItems": 1, "maxItems": 2},
                         "n": {"type": "integer"}},
          "required": ["tags", "n"], "additionalProperties": False}
CONSTRAINTS = [StructuredOutputsParams(json=SCHEMA),   # free whitespace: capped by the stage
               StructuredOutputsParams(choice=["yes", "no", "maybe so"]),
               StructuredOutputsParams(regex=r"[a-c]{1,3}-[0-9]")]
# ... that a random model ends within 60 tokens (no free whitespace to wander in)
ENDING = [StructuredOutputsParams(json={**SCHEMA, "properties": {
    **SCHEMA["properties"], "n": {"type": "boolean"}}}, disable_any_whitespace=True)] + CONSTRAINTS[1:]


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), max_model_len=512)


def _stage(llm, workers: int) -> StructuredOutputs:
    tokenizer = llm.get_tokenizer()
    return StructuredOutputs(tokenizer, llm.llm_engine.spec.vocab_size,
                             {tokenizer.eos_token_id}, torch.device("cpu"), max_threads=1,
                             workers=workers)


def _row(stage, index: int) -> Sequence:
    seq = Sequence(str(index), 0, [5, 6, 7], SamplingParams(max_tokens=100))
    stage.start(seq, stage.compile(CONSTRAINTS[index % len(CONSTRAINTS)]))
    return seq


def _allowed(matcher, num_words: int) -> list[int]:
    if matcher.is_terminated():
        return []
    mask = torch.zeros((1, num_words), dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask, 0)
    return [32 * w + b for w, word in enumerate(mask[0].tolist()) for b in range(32)
            if (word >> b) & 1]


def test_workers_give_what_matchers_in_process_give(llm, monkeypatch):
    monkeypatch.setattr(grammar_workers, "INITIAL_SLOTS", 4)   # the buffer grows twice
    here, there = _stage(llm, 0), _stage(llm, 2)
    rng = random.Random(0)
    pairs = [(_row(here, i), _row(there, i)) for i in range(6)]
    reasons = {"abort": 0, "stop": 0}
    next_index = 6
    for step in range(40):
        mask_here = here.fill([a for a, _ in pairs])
        mask_there = there.fill([b for _, b in pairs])
        if mask_here is None:
            assert mask_there is None
        else:
            assert torch.equal(mask_here.bitmask, mask_there.bitmask), step
            assert (mask_here.rows is None) == (mask_there.rows is None)
            if mask_here.rows is not None:
                assert torch.equal(mask_here.rows, mask_there.rows)
        live = [(a, b) for a, b in pairs if not a.is_finished]
        tokens = []
        for a, _ in live:   # mostly allowed tokens, now and then a refused one
            allowed = _allowed(a.grammar, here._num_words) or [3]
            tokens.append(rng.randrange(here.mask_vocab) if rng.random() < 0.1
                          else rng.choice(allowed))
        here.accept_tokens([a for a, _ in live], tokens)
        there.accept_tokens([b for _, b in live], tokens)
        for (a, b), token in zip(live, tokens):
            a.token_ids.append(token)
            b.token_ids.append(token)
            got, want = there.accept(b, token), here.accept(a, token)
            assert got == want, (step, a.request_id)
            assert b.grammar_whitespace == a.grammar_whitespace
            if want is not None:
                reasons[want] += 1
                for seq in (a, b):
                    seq.finish_reason, seq.status = want, SequenceStatus.FINISHED
        # finished rows leave (their slots are released and reused), new ones come in
        pairs = [(a, b) for a, b in pairs if not a.is_finished]
        del live, a, b
        while len(pairs) < 6 + step // 8:
            pairs.append((_row(here, next_index), _row(there, next_index)))
            next_index += 1
    assert reasons["abort"] and reasons["stop"]
    workers = there._workers
    assert workers is not None and workers._staging.shape[0] >= 16
    assert workers._next_slot < next_index   # slots were reused
    workers.close()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_outputs_with_grammar_workers(checkpoint, monkeypatch, async_scheduling):
    """Constrained rows (seeded sampling) and free rows in one batch: the same outputs with
    the matchers in two worker processes as in the engine's process."""
    prompts = [f"Row {i} says" for i in range(10)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                             structured_outputs=ENDING[i % 3] if i % 4 else None)
              for i in range(10)]
    outputs = {}
    for workers in ("0", "2"):
        monkeypatch.setenv("HPCINFER_GRAMMAR_WORKERS", workers)
        llm = LLM(checkpoint("llama"), max_model_len=512, async_scheduling=async_scheduling)
        outputs[workers] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                            for o in llm.generate(prompts, params, use_tqdm=False)]
        assert (llm.llm_engine.structured._workers is not None) == (workers == "2")
    assert outputs["2"] == outputs["0"]
    constrained = [r for i, (_, r) in enumerate(outputs["0"]) if i % 4]
    assert constrained == ["stop"] * 7


def test_a_dead_worker_stops_the_engine_with_a_clear_error(llm):
    stage = _stage(llm, 2)
    seqs = [_row(stage, i) for i in range(4)]
    stage.fill(seqs)
    victim = stage._workers._procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    with pytest.raises(RuntimeError, match=r"grammar worker 1 \(pid \d+\) exited with code -9"):
        stage.accept_tokens(seqs, [_allowed_first(stage, s) for s in seqs])
    stage._workers.close()


def _allowed_first(stage, seq) -> int:
    mask = stage.fill([seq]).bitmask[0].tolist()
    return next(32 * w + b for w, word in enumerate(mask) for b in range(32) if (word >> b) & 1)


def test_default_number_of_workers(monkeypatch):
    monkeypatch.setenv("HPCINFER_GRAMMAR_WORKERS", "3")
    assert grammar_workers.default_num_workers() == 3
    monkeypatch.setenv("HPCINFER_GRAMMAR_WORKERS", "many")
    with pytest.raises(ValueError, match="HPCINFER_GRAMMAR_WORKERS='many' is not a number"):
        grammar_workers.default_num_workers()
    monkeypatch.delenv("HPCINFER_GRAMMAR_WORKERS")
    assert grammar_workers.default_num_workers() == 0   # off unless asked for
