"""Async scheduling (hpcinfer/engine/inflight.py) gives exactly the synchronous outputs
(greedy and seeded rows; unseeded samples are reproducible run to run, not equal to a
synchronous engine's: inflight.py says why).

Tokens, text, finish and stop reasons are compared request by request between an engine
with ``async_scheduling=False`` and one with it on, for stop strings, stop token ids, EOS,
min_tokens, max_tokens (1 included), n > 1 (greedy and seeded), chunked prefill, prefix
caching and preemption. Stops are taken from a first synchronous run so they really fire.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine.llm_engine import LLMEngine
from hpcinfer.engine.sequence import PLACEHOLDER_TOKEN

FAMILY = "llama3"
LENGTHS = (1, 3, 9, 17, 40, 77, 5, 23)


def _pool_bytes(path: str, num_blocks: int, block_size: int = 16) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return num_blocks * 2 * cfg["num_hidden_layers"] * block_size * kv_heads * head_dim * 4


def _run(path, prompts, params, async_scheduling, eos=None, **kwargs):
    llm = LLM(path, max_model_len=256, async_scheduling=async_scheduling, **kwargs)
    engine: LLMEngine = llm.llm_engine
    if eos is not None:
        engine.eos_token_ids = frozenset({eos})
    patched = []
    prepare = engine.runner.prepare

    def spy(*args, **kw):
        patched.append(kw.get("pending") is not None)
        return prepare(*args, **kw)

    engine.runner.prepare = spy
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    result = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
              for o in outs]
    for request in result:
        for token_ids, *_ in request:
            assert PLACEHOLDER_TOKEN not in token_ids
    return result, engine, sum(patched)


def _params_with_stops(llm_outputs, tokenizer):
    """One SamplingParams per prompt, each ending (or not) a different way."""
    base = [o.outputs[0].token_ids for o in llm_outputs]
    text3 = tokenizer.decode(base[3][:12])
    stop_string = text3[len(tokenizer.decode(base[3][:6])):][:3]
    return [
        # penalties count the token still in flight on the device (sampler.py)
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.2, presence_penalty=0.1),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[base[1][5]]),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_string]),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, n=2),
        SamplingParams(temperature=0.9, seed=3, max_tokens=12, n=2, repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=4,
                       stop_token_ids=[base[6][1]]),
        SamplingParams(temperature=0, max_tokens=20),   # EOS (set below) ends it
    ], base[7][3]


@pytest.mark.parametrize("variant", ["plain", "chunked+preemption+prefix"])
def test_async_equals_sync(variant, checkpoint, make_prompts):
    path = checkpoint(FAMILY)
    prompts = make_prompts(LENGTHS, prefix=tuple(range(40, 72)) if variant != "plain" else ())
    kwargs = {} if variant == "plain" else dict(
        max_num_batched_tokens=48, max_num_seqs=6, kv_cache_memory_bytes=_pool_bytes(path, 16))
    first = LLM(path, max_model_len=256, async_scheduling=False, **kwargs)
    params, eos = _params_with_stops(
        first.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False), first.get_tokenizer())
    want, sync_engine, sync_patched = _run(path, prompts, params, False, eos, **kwargs)
    got, engine, patched = _run(path, prompts, params, True, eos, **kwargs)
    assert sync_patched == 0 and patched > 10, "the async path did not run"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} ({params[i]}): async {g} != sync {w}"
    # The stops really fired: stop token id, stop string, EOS; max_tokens=1 gave one token.
    assert [want[i][0][2] for i in (1, 3, 7)] == ["stop"] * 3, want
    assert len(want[2][0][0]) == 1
    if variant != "plain":
        assert engine.num_preemptions > 0 and engine.prefix_cache_hits > 0
        assert engine.stats.num_steps > 20


def test_logprobs_request_runs_synchronous_steps_with_the_same_outputs(checkpoint,
                                                                       make_prompts):
    path = checkpoint(FAMILY)
    prompts = make_prompts((5, 30, 12))
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                             repetition_penalty=1.3)]
    want, _, _ = _run(path, prompts, params, False)
    got, engine, patched = _run(path, prompts, params, True)
    assert got == want and patched == 0
    assert engine._num_sync_only == 0   # every request left the engine's count
    # Once only async-safe requests are live, steps go async again.
    again, _, patched = _run(path, prompts, params[:1] * 3, True)
    assert patched > 0 and again[0] == want[0]


def test_unseeded_sampling_runs_async_steps_reproducibly(checkpoint, make_prompts):
    """Unseeded temperature rows no longer hold the engine in synchronous steps: they run
    async, mixed with greedy rows (whose tokens stay the synchronous ones), end by their
    stops as before, and the same engine seed gives the same samples run to run."""
    path = checkpoint(FAMILY)
    prompts = make_prompts((5, 30, 12, 7))
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, n=2),
              SamplingParams(temperature=0.7, min_p=0.05, max_tokens=1, ignore_eos=True)]
    want, _, _ = _run(path, prompts, params, False)
    got, engine, patched = _run(path, prompts, params, True)
    again, _, _ = _run(path, prompts, params, True)
    assert patched > 5 and engine._num_sync_only == 0
    assert got == again                       # same seed, same inputs: same samples
    assert got[0] == want[0]                  # greedy rows unchanged
    assert [[len(c[0]) for c in r] for r in got] == [[12], [12], [9, 9], [1]]


def test_abort_while_a_token_is_in_flight(checkpoint, make_prompts):
    path = checkpoint(FAMILY)
    prompts = make_prompts((6, 11))
    engine = LLMEngine.from_kwargs(path, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    outputs = {}
    for _ in range(5):
        for out in engine.step():
            outputs[out.request_id] = out
    seq_a = engine.requests["a"].seqs[0]
    assert seq_a.has_placeholder and seq_a.token_ids[-1] == PLACEHOLDER_TOKEN
    engine.abort_request("a")
    assert PLACEHOLDER_TOKEN not in seq_a.token_ids and seq_a.finish_reason == "abort"
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert PLACEHOLDER_TOKEN not in outputs["b"].outputs[0].token_ids
    reference = LLM(path, max_model_len=256, async_scheduling=False).generate(
        [prompts[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert outputs["b"].outputs[0].token_ids == reference
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_drain_returns_what_a_synchronous_engine_already_returned(checkpoint, make_prompts):
    path = checkpoint(FAMILY)
    prompts = make_prompts((4, 9, 13))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 5, 9)]

    def run(async_scheduling, steps):
        engine = LLMEngine.from_kwargs(path, max_model_len=256,
                                       async_scheduling=async_scheduling)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        finished = {}
        for _ in range(steps):
            finished.update({o.request_id: o.outputs[0].token_ids
                             for o in engine.step(final_only=True)})
        return engine, finished

    _, want = run(False, 5)          # after 5 synchronous steps: requests 0 and 1 are done
    engine, got = run(True, 5)
    assert set(want) == {"0", "1"} and set(got) == {"0"}   # "1" is still being read back
    got.update({o.request_id: o.outputs[0].token_ids for o in engine.drain(final_only=True)})
    assert got == want and engine.drain() == []
    while engine.has_unfinished_requests():                # stepping goes on after a drain
        got.update({o.request_id: o.outputs[0].token_ids
                    for o in engine.step(final_only=True)})
    _, everything = run(False, 20)
    assert got == everything
