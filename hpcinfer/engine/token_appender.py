"""Appending one sampled token to a sequence, and deciding whether it ends there.

The engine's one writer of ``seq.token_ids`` after the prompt: the step loop (llm_engine.py)
calls ``append`` for every sampled row, synchronous or read back from an async step. The order
of the checks is vLLM's: length, then min_tokens, then EOS, then stop token ids, then (for a
constrained row) the grammar's end, then stop strings on the detokenized text.
"""
from __future__ import annotations

from hpcinfer.engine.detokenizer import find_stop_string
from hpcinfer.engine.sequence import Sequence


class TokenAppender:
    """Sets ``seq.finish_reason`` / ``stop_reason``; logprob entries get their decoded text."""

    def __init__(self, tokenizer, max_model_len: int, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids

    def append(self, seq: Sequence, token_id: int, logprob: float | None, top: dict | None,
               structured=None) -> None:
        """``structured``: the engine's StructuredOutputs (engine/structured.py) when any
        request has a constraint, else None."""
        seq.token_ids.append(token_id)
        if seq.logprobs is not None:
            seq.cumulative_logprob += logprob
            if self.tokenizer is not None:   # (skip_tokenizer_init: decoded_token None)
                for tid, entry in top.items():
                    entry.decoded_token = self.tokenizer.decode([tid])
            seq.logprobs.append(top)
        params = seq.params
        stopped_by_token = self.check_stop_token(seq, token_id)
        if seq.grammar is not None and seq.finish_reason is None:
            # a complete grammar ends the row as EOS would (it allowed only stop tokens)
            seq.finish_reason = structured.accept(seq, token_id)
            stopped_by_token = seq.finish_reason == "stop" and token_id in self.eos_token_ids
        if stopped_by_token and not params.include_stop_str_in_output:
            seq.detok.flush()  # the stop token's own text is left out, as in vLLM
            return
        if not params.stop_strings:   # no text is needed before it is read: decode later
            seq.detok.defer(token_id)
        elif (num_new_chars := len(seq.detok.append(token_id))) and (   # NoDetokenizer: 0
                seq.num_output_tokens > params.min_tokens and seq.finish_reason != "stop"):
            found = find_stop_string(seq.detok.output_text, num_new_chars, params.stop_strings,
                                     params.include_stop_str_in_output)
            if found is not None:
                stop_str, text_len = found
                seq.detok.output_text = seq.detok.output_text[:text_len]
                seq.finish_reason, seq.stop_reason = "stop", stop_str
                return
        if seq.finish_reason is not None:
            seq.detok.flush()  # a character still incomplete at the end shows as U+FFFD

    def check_stop_token(self, seq: Sequence, token_id: int) -> bool:
        """Set finish fields for length / EOS / stop token (vLLM's order); True if the last
        token is a stop token."""
        params = seq.params
        if len(seq) >= self.max_model_len or (params.max_tokens is not None
                                              and seq.num_output_tokens >= params.max_tokens):
            seq.finish_reason = "length"
            return False
        if seq.num_output_tokens < params.min_tokens:
            return False
        if not params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason = "stop"
            return True
        if token_id in params.stop_token_id_set:
            seq.finish_reason, seq.stop_reason = "stop", token_id
            return True
        return False

    def ends_by_length_next(self, seq: Sequence) -> bool:
        """Whether the token now being sampled ends ``seq`` by length (as check_stop_token)."""
        max_tokens = seq.params.max_tokens
        return len(seq) + 1 >= self.max_model_len or (
            max_tokens is not None and seq.num_output_tokens + 1 >= max_tokens)
