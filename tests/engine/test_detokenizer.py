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
