"""The engine's own copy of a request's SamplingParams, checked against the model.

``SamplingParams.resolved()`` re-validates what the caller may have changed since
construction; ``resolve_params`` adds the checks that need the loaded model (vocabulary size,
max_logprobs, the tokenizer for bad_words). LLMEngine.add_request and LLM call it.
"""
from __future__ import annotations

from hpcinfer.engine.params import SamplingParams


def resolve_params(params: SamplingParams, request_id: str, vocab_size: int,
                   max_logprobs: int, tokenizer) -> SamplingParams:
    """A checked, normalised copy of ``params``; ValueError names the request and the field.
    A copy made here (``is_resolved``) is returned as it is: LLM checks each distinct
    SamplingParams once for a whole batch, not once per prompt."""
    if params.is_resolved:
        return params
    try:
        params = params.resolved()
    except ValueError as e:
        raise ValueError(f"request {request_id!r}: {e}") from None
    for name in ("logprobs", "prompt_logprobs"):
        _check_num_logprobs(params, name, request_id, vocab_size, max_logprobs)
    if params.logit_bias:
        params.logit_bias = {int(t): float(b) for t, b in params.logit_bias.items()}
    for name in ("logit_bias", "allowed_token_ids"):
        bad = [t for t in (getattr(params, name) or ()) if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: SamplingParams.{name} has token id "
                             f"{bad[0]} outside the vocabulary [0, {vocab_size})")
    if tokenizer is None:   # skip_tokenizer_init
        _check_without_tokenizer(params, request_id)
    if params.bad_words:
        params.bad_words_token_ids = bad_words_token_ids(tokenizer, params.bad_words)
    params.is_resolved = True
    return params


def _check_without_tokenizer(params: SamplingParams, request_id: str) -> None:
    """An engine made with skip_tokenizer_init=True has no text: outputs are token ids only
    (detokenize off, text ""), and what is matched or compiled on text is refused."""
    needs_text = [name for name, used in (
        ("stop", bool(params.stop_strings)), ("bad_words", bool(params.bad_words)),
        ("structured_outputs", params.structured_outputs is not None)) if used]
    if needs_text:
        raise ValueError(f"request {request_id!r}: SamplingParams.{needs_text[0]} needs the "
                         "tokenizer, and this engine was made with skip_tokenizer_init=True: "
                         "use stop_token_ids, or make the LLM without skip_tokenizer_init")
    params.detokenize = False


def _check_num_logprobs(params: SamplingParams, name: str, request_id: str, vocab_size: int,
                        max_logprobs: int) -> None:
    """-1 means the whole vocabulary; more than max_logprobs (or the vocabulary) is refused."""
    k = getattr(params, name)
    if k == -1:
        k = vocab_size
        setattr(params, name, k)
    if k is not None and max_logprobs != -1 and k > max_logprobs:
        raise ValueError(f"request {request_id!r}: SamplingParams.{name}={k} is more than "
                         f"max_logprobs={max_logprobs}: ask for fewer, or raise "
                         "LLM(max_logprobs=...)")
    if k is not None and k > vocab_size:
        raise ValueError(f"request {request_id!r}: {name}={k} is more than the vocabulary "
                         f"({vocab_size} tokens)")


class NoDetokenizer:
    """SamplingParams.detokenize=False: token ids only, the text stays empty."""

    output_text = ""

    def append(self, token_id: int) -> str:
        return ""

    def defer(self, token_id: int) -> None:
        pass

    def flush(self) -> None:
        pass


def bad_words_token_ids(tokenizer, bad_words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word as token ids, with and without a leading space (vLLM's rule: a word
    inside a sentence is usually tokenized with its space)."""
    found: dict[tuple[int, ...], None] = {}
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                found[ids] = None
    return tuple(found)
