"""SamplingParams: what one request asks of the sampler, with vLLM's names and meanings.

Mutable as vLLM's (``params = llm.get_default_sampling_params(); params.max_tokens = 8``):
it is validated at construction and again when a request is added, where the engine takes
its own checked, normalised copy (``resolved()``), so a value set afterwards still fails with
``ValueError`` naming the field, and changing the object later never touches a running
request. Nothing downstream writes to the engine's copy; per-child copies for ``n > 1`` come
from ``dataclasses.replace``.
"""
from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Sequence

from hpcinfer.engine.structured_params import StructuredOutputsParams

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput holds (vLLM's values)."""

    CUMULATIVE = 0   # everything generated so far
    DELTA = 1        # only what is new since the last output
    FINAL_ONLY = 2   # one output, when the request finishes (what LLM.generate uses)


@dataclass
class SamplingParams:
    """vLLM-compatible sampling parameters.

    ``top_k`` of 0 or -1 means "all tokens". ``logprobs=k`` returns the k most likely tokens
    plus the sampled one per generated token (log-softmax of the raw model logits, as vLLM's
    default ``raw_logprobs`` mode); ``prompt_logprobs=k`` the same for every prompt token
    after the first (engine/prompt_logprobs.py). ``seed`` gives a per-request generator, so
    the same seed gives the same text whatever else is in the batch. ``best_of`` samples that many
    completions and returns the ``n`` with the highest cumulative logprob. ``logit_bias``
    ({token id: bias}), ``allowed_token_ids`` and ``bad_words`` edit the logits before
    sampling, as vLLM's built-in logits processors. ``structured_outputs`` (a
    StructuredOutputsParams; ``guided_decoding`` is its older name) constrains the output to a
    JSON schema, regex, choice or grammar (docs/structured-outputs.md).
    """

    n: int = 1
    best_of: int | None = None
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
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: Any = None
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    guided_decoding: Any = None
    structured_outputs: Any = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    # Normalised forms (set by __post_init__ and resolved(); not arguments).
    stop_strings: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)
    stop_token_id_set: frozenset[int] = field(default=frozenset(), init=False, repr=False,
                                              compare=False)
    # Token-id sequences of bad_words, filled by the engine (it owns the tokenizer).
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), init=False,
                                                             repr=False, compare=False)
    # True on the engine's checked copy (resolve_params), so it is not checked twice.
    is_resolved: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    @classmethod
    def from_optional(cls, **kwargs) -> SamplingParams:
        """vLLM's constructor that reads None as "the default"."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's ``clone``): changing it never changes this one."""
        return copy.deepcopy(self)

    def resolved(self) -> SamplingParams:
        """The engine's copy: validated again (the fields may have been set after
        construction) and normalised (greedy drops top-p/top-k/min-p)."""
        params = dataclasses.replace(self)  # runs __post_init__: normalise + validate
        params.bad_words_token_ids = self.bad_words_token_ids
        if params.is_greedy:
            # Greedy ignores the truncation knobs; normalising them keeps the sampler simple.
            params.top_p, params.top_k, params.min_p = 1.0, 0, 0.0
        return params

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def has_logits_edits(self) -> bool:
        """logit_bias, allowed_token_ids or bad_words change the logits."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_token_ids)

    @property
    def reads_output_tokens(self) -> bool:
        """Whether the logits depend on the host reading the tokens generated so far (bad
        words longer than one token): such rows cannot run a step ahead (engine/inflight.py;
        penalties count a token still in flight on the device, penalties.py)."""
        return any(len(w) > 1 for w in self.bad_words_token_ids)

    @property
    def num_samples(self) -> int:
        """How many completions are generated: best_of (if set) or n."""
        return self.best_of or self.n

    @property
    def all_stop_token_ids(self) -> frozenset[int]:
        return self.stop_token_id_set

    def child(self, index: int) -> SamplingParams:
        """Params of the index-th of the parallel samples (vLLM: child seed = seed + index)."""
        seed = None if self.seed is None else self.seed + index
        child = dataclasses.replace(self, n=1, best_of=None, seed=seed)
        child.bad_words_token_ids = self.bad_words_token_ids
        if self.best_of is not None and self.best_of > self.n and self.logprobs is None:
            child.logprobs = 0  # the ranking needs each sample's cumulative logprob
        return child

    def _normalise(self) -> None:
        if self.guided_decoding is not None and self.structured_outputs is None:
            # vLLM's older name: the engine reads structured_outputs only
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_id_set = frozenset(self.stop_token_ids or ())
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.output_kind, int) and not isinstance(self.output_kind, bool):
            self.output_kind = RequestOutputKind(self.output_kind)

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.best_of is None or (isinstance(self.best_of, int) and self.best_of >= self.n),
               "best_of", self.best_of, f"None or an integer >= n ({self.n})")
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
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= -1),
               "logprobs", self.logprobs, "None or an integer >= 0 (-1: the whole vocabulary)")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", self.stop,
               "a non-empty string or a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_id_set),
               "stop_token_ids", self.stop_token_ids, "a list of token ids (integers >= 0)")
        self._validate_vllm_extras()

    def _validate_vllm_extras(self) -> None:
        _check(self.prompt_logprobs is None or (
            isinstance(self.prompt_logprobs, int) and not isinstance(self.prompt_logprobs, bool)
            and self.prompt_logprobs >= -1), "prompt_logprobs", self.prompt_logprobs,
            "None or an integer >= 0 (-1: the whole vocabulary)")
        _check(self.logits_processors is None, "logits_processors", self.logits_processors,
               "None: hpcinfer has no custom logits processors")
        self._validate_structured_outputs()
        _check(isinstance(self.detokenize, bool), "detokenize", self.detokenize, "True or False")
        _check(self.detokenize or not self.stop_strings, "detokenize", self.detokenize,
               "True when stop strings are given (they are matched on the text)")
        _check(self.truncate_prompt_tokens is None or (
            isinstance(self.truncate_prompt_tokens, int) and (self.truncate_prompt_tokens >= 1
                                                             or self.truncate_prompt_tokens == -1)),
            "truncate_prompt_tokens", self.truncate_prompt_tokens,
            "None, -1 (max_model_len) or an integer >= 1")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")
        _check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            _is_int_like(t) and int(t) >= 0 and _is_number(b) for t, b in self.logit_bias.items())),
            "logit_bias", self.logit_bias, "None or a dict {token id: bias}")
        _check(self.allowed_token_ids is None or (
            len(self.allowed_token_ids) > 0
            and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids", self.allowed_token_ids, "None or a non-empty list of token ids")
        _check(self.bad_words is None or (not isinstance(self.bad_words, str) and all(
            isinstance(w, str) and w for w in self.bad_words)),
            "bad_words", self.bad_words, "None or a list of non-empty strings")
        _check(self.extra_args is None or isinstance(self.extra_args, dict), "extra_args",
               self.extra_args, "None or a dict")

    def _validate_structured_outputs(self) -> None:
        so = self.structured_outputs
        _check(self.guided_decoding is None, "guided_decoding", self.guided_decoding,
               "None when structured_outputs is given (it is the older name of the same thing)")
        _check(so is None or isinstance(so, StructuredOutputsParams), "structured_outputs", so,
               "None or a StructuredOutputsParams (hpcinfer.sampling_params)")
        # The grammar decides where the output ends (it allows EOS only when complete): a
        # min_tokens ban on EOS could leave a row with no allowed token.
        _check(so is None or self.min_tokens == 0, "min_tokens", self.min_tokens,
               "0 with structured_outputs (the constraint decides where the output ends)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int_like(value) -> bool:
    # logit_bias keys arrive as strings from JSON (the OpenAI API's shape)
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and value.isdigit())


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: must be {allowed}")
