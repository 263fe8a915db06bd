"""Incremental detokenization (both paths) and stop-string search."""
from __future__ import annotations

import random

import pytest

from hpcinfer.engine.config import EngineConfig
from hpcinfer.engine.detokenizer import IncrementalDetokenizer, find_stop_string


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint("llama"))


def run(detok, ids):
    pieces = [detok.append(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.output_text
    return detok.output_text


def test_stream_and_window_paths_agree_and_match_full_decode(tokenizer):
    rng = random.Random(0)
    num_stream = 0
    for _ in range(100):
        prompt = [rng.randrange(3, 384) for _ in range(rng.randrange(1, 12))]
        ids = [rng.randrange(0, 384) for _ in range(40)]
        fast = IncrementalDetokenizer(tokenizer, prompt)
        num_stream += fast._stream is not None
        window = IncrementalDetokenizer(tokenizer, prompt)
        window._stream = None
        assert run(fast, ids) == run(window, ids)
    assert num_stream > 50  # the fast path really ran


def test_readable_text_round_trips(tokenizer):
    text = "Hello world, this is a cluster job: résumé naïve ünïcode 東京 🙂 done."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    prompt = tokenizer("Say:", add_special_tokens=False).input_ids
    assert run(IncrementalDetokenizer(tokenizer, prompt), ids) == tokenizer.decode(ids)
    window = IncrementalDetokenizer(tokenizer, prompt)
    window._stream = None
    assert run(window, ids) == tokenizer.decode(ids)


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer("ab cd", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert run(IncrementalDetokenizer(tokenizer, [5]), ids) == "ab cd"
    kept = run(IncrementalDetokenizer(tokenizer, [5], skip_special_tokens=False), ids)
    assert kept == "ab cd" + tokenizer.eos_token


def deferred(detok, ids, read_at=()):
    """``ids`` deferred (the appender's path without stop strings), the text read after the
    positions in ``read_at`` (a streaming caller) and at the end (flush, as at finish)."""
    for i, t in enumerate(ids):
        detok.defer(t)
        if i in read_at:
            detok.output_text
    detok.flush()
    return detok.output_text


def test_deferred_text_equals_token_by_token(tokenizer):
    """Deferred tokens decode to the text the token-by-token paths make: all at once at the
    end (the stream untouched), caught up when read midway, on the window method, with
    special tokens kept."""
    rng = random.Random(1)
    at_once = 0
    for trial in range(150):
        prompt = [rng.randrange(3, 384) for _ in range(rng.randrange(1, 12))]
        ids = [rng.randrange(0, 384) for _ in range(rng.randrange(1, 50))]
        skip = trial % 3 != 0
        want = run(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip), ids)
        lazy = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        stream_untouched = lazy._prime_text is not None
        assert deferred(lazy, ids) == want
        at_once += stream_untouched and lazy._stream is None   # (a catch-up keeps it)
        midway = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        assert deferred(midway, ids, read_at={len(ids) // 3, len(ids) // 2}) == want
        window = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        window._stream = window._prime_text = None
        assert deferred(window, ids) == want
        mixed = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
        for t in ids[:len(ids) // 2]:
            mixed.defer(t)
        for t in ids[len(ids) // 2:]:
            mixed.append(t)   # a caught-up row takes tokens one by one again
        mixed.flush()
        assert mixed.output_text == want
    assert at_once > 75   # the one-call decode really ran


def test_deferred_text_is_decoded_in_one_call(tokenizer, monkeypatch):
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Say:", add_special_tokens=False).input_ids)
    ids = tokenizer("Hello world, résumé 東京 🙂", add_special_tokens=False).input_ids
    calls = []
    rust = detok._rust
    monkeypatch.setattr(detok, "_rust", type("Counting", (), {
        "decode": lambda self, i, skip_special_tokens: calls.append(i) or rust.decode(
            i, skip_special_tokens=skip_special_tokens)})())
    assert deferred(detok, ids) == tokenizer.decode(ids)
    assert len(calls) == 1


def test_a_stop_string_cuts_deferred_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [5])
    for t in tokenizer("ab cd ef", add_special_tokens=False).input_ids:
        detok.defer(t)
    detok.output_text = detok.output_text[:2]
    assert detok.output_text == "ab"


@pytest.mark.parametrize("text, new, stops, include, want", [
    ("hello world", 5, ("wor",), False, ("wor", 6)),
    ("hello world", 5, ("wor",), True, ("wor", 9)),
    ("hello world", 5, ("lo w",), False, ("lo w", 3)),       # completed by the new chars
    ("hello world", 4, ("lo w",), False, None),              # completed before them
    ("hello world", 1, ("hello",), False, None),             # ended before the new chars
    ("abcabc", 3, ("zz", "bc"), False, ("bc", 4)),           # only the new tail is searched
    ("abcabc", 6, ("zz", "bc"), False, ("bc", 1)),
])
def test_find_stop_string(text, new, stops, include, want):
    assert find_stop_string(text, new, stops, include) == want


def test_engine_config_rejects_unknown_and_bad_values():
    with pytest.raises(TypeError, match="did you mean 'enable_prefix_caching'"):
        EngineConfig.from_kwargs("m", enable_prefix_cache=True)
    with pytest.raises(ValueError, match="gpu_memory_utilization=1.5"):
        EngineConfig(model="m", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="dtype='int8'"):
        EngineConfig(model="m", dtype="int8")
    config = EngineConfig.from_kwargs("m", max_num_seqs=4, swap_space=4, disable_log_stats=True)
    assert config.max_num_seqs == 4
    with pytest.raises(AttributeError):
        config.max_num_seqs = 8  # frozen
