"""SamplingParams: what one request asks of the sampler, with vLLM's names and meanings.

A frozen dataclass, validated once at construction: every invalid value raises ``ValueError``
naming the field and its allowed range. Nothing downstream writes to it; the engine derives
per-child copies for ``n > 1`` with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """vLLM-compatible sampling parameters (the subset offline batch inference uses).

    ``top_k`` of 0 or -1 means "all tokens". ``logprobs=k`` returns the k most likely tokens
    plus the sampled one per generated token (log-softmax of the raw model logits, as vLLM's
    default ``raw_logprobs`` mode). ``seed`` gives a per-request generator, so the same seed
    gives the same text whatever else is in the batch.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Normalised forms (derived in __post_init__, not arguments).
    stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False)
    stop_token_id_set: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop_strings", stop)
        object.__setattr__(self, "stop_token_id_set", frozenset(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()
        if self.is_greedy:
            # Greedy ignores the truncation knobs; normalising them keeps the sampler simple.
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 0)
            object.__setattr__(self, "min_p", 0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def child(self, index: int) -> SamplingParams:
        """Params of the index-th of ``n`` parallel samples (vLLM: child seed = seed + index)."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2.0 <= value <= 2.0, name, value, "in [-2, 2]")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "> 0")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature",
               self.temperature, ">= 0 (0 = greedy)")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "-1 or 0 (all tokens) or an integer >= 1")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed,
               "None or an integer")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "None or an integer >= 1")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"<= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               "logprobs", self.logprobs, "None or an integer >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", self.stop,
               "a non-empty string or a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_id_set),
               "stop_token_ids", self.stop_token_ids, "a list of token ids (integers >= 0)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {allowed}")
