"""Output text of real tokenizers: rows without stop strings defer their tokens and decode
them in one call at the end (engine/detokenizer.py); that text must equal what decoding token
by token makes. SmolLM2's byte-level BPE and Gemma 3's SentencePiece-style BPE (byte
fallback, leading-space marker) are the two decoder kinds our users' models have; the prompts
are real chat/text prompts and random ids (which split UTF-8 characters across tokens)."""
from __future__ import annotations

import random

import pytest

from hpcinfer.engine.detokenizer import IncrementalDetokenizer

PIECES = ["Hello", " world", "  ", "\n", "é", "東京", "🙂", "naïve", " x", "\t", "<b>", "1234",
          "Привет", " ", "über", "‐"]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tokenizer(request):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(request.getfixturevalue(f"{request.param}_dir"))


def _token_by_token(tokenizer, prompt, ids, skip):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    for t in ids:
        detok.append(t)
    detok.flush()
    return detok.output_text


def _deferred(tokenizer, prompt, ids, skip):
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    for t in ids:
        detok.defer(t)
    stream_untouched = detok._prime_text is not None
    detok.flush()   # decoded at once: the stream is dropped (a catch-up keeps it)
    return detok.output_text, stream_untouched and detok._stream is None


def test_deferred_text_equals_token_by_token(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    prompt_text = tokenizer("Question: où est 東京? 🙂", add_special_tokens=False).input_ids
    at_once = 0
    for trial in range(200):
        skip = trial % 3 != 0
        if trial % 2:
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        else:
            prompt = prompt_text
            text = "".join(rng.choice(PIECES) for _ in range(20))
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if rng.random() < 0.3:
                ids.append(tokenizer.eos_token_id)
        want = _token_by_token(tokenizer, prompt, ids, skip)
        got, decoded_at_once = _deferred(tokenizer, prompt, ids, skip)
        assert got == want, (trial, prompt, ids)
        at_once += decoded_at_once
    assert at_once > 150   # the one-call decode ran for (nearly) every row
