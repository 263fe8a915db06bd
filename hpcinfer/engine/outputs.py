"""Request results with vLLM's field names (RequestOutput, CompletionOutput, Logprob)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's log-probability; ``rank`` is 1 for the most likely token (vLLM's shape)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated token: {token_id: Logprob} holding the top-k tokens plus the sampled one.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: None for the first, then {token_id: Logprob}: the actual token + top-k.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``finish_reason``: None while running, then "stop" (EOS, a stop token or a stop string) or
    "length" (max_tokens or max_model_len) or "abort". ``stop_reason``: the stop string or stop
    token id that ended it, None for EOS or length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Times (``time.time()`` seconds) of one request, with vLLM's names; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far (with
    ``RequestOutputKind.DELTA``, only what is new since the last output)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None


# --- pooling tasks (embed / classify / score / reward / encode), vLLM's shapes ---

@dataclass
class PoolingOutput:
    """``data``: the raw pooled tensor (``encode``; ``reward``: [num_tokens, num_labels])."""

    data: "torch.Tensor"  # noqa: F821 (torch is not imported on the login side)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    """One pooling request: ``outputs`` is a PoolingOutput, EmbeddingOutput,
    ClassificationOutput or ScoringOutput (the subclasses below only name which)."""

    request_id: str
    outputs: PoolingOutput | EmbeddingOutput | ClassificationOutput | ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput):
    outputs: EmbeddingOutput


class ClassificationRequestOutput(PoolingRequestOutput):
    outputs: ClassificationOutput


class ScoringRequestOutput(PoolingRequestOutput):
    outputs: ScoringOutput
