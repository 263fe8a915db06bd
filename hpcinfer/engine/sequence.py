"""Sequence: one completion being generated (a request with n > 1 owns n of them).

Ownership: the scheduler writes ``status`` and ``num_computed_tokens``; the block manager
writes ``kv_row``, ``num_blocks`` and ``block_hashes``; the engine appends tokens and sets
the finish fields. The runner only reads.
"""
from __future__ import annotations

import enum
import itertools

from hpcinfer.engine.params import SamplingParams


# Stands in token_ids for a token sampled on the GPU but not yet read back (inflight.py).
PLACEHOLDER_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    # seq_id: unique in the process for the life of the process (nano-vllm's counter). The
    # sampler's penalty state (engine/penalties.py) keys rows by it: a request id can be used
    # again once its request has finished, and id() again once the object is freed.
    counter = itertools.count()

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_order: int = 0):
        self.seq_id = next(Sequence.counter)
        self.request_id = request_id
        self.index = index                       # which of the request's n completions
        self.arrival_order = arrival_order
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0             # tokens whose KV is in the cache
        self.num_cached_tokens = 0               # of those, how many came from the prefix cache
        self.num_preemptions = 0
        # Block manager state: a row of its block-table array while holding blocks.
        self.kv_row = -1
        self.num_blocks = 0
        self.num_registered_blocks = 0           # leading blocks whose hash is registered
        self.block_hashes: list[int] = []        # chained hashes of this sequence's full blocks
        self.in_flight_end = 0                   # its blocks below this are counted in flight
        # Output state (written by the engine).
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # Prompt logprobs (engine/prompt_logprobs.py): one entry per prompt token, None for the
        # first; only the request's first sequence collects them (they are the same for all).
        self.prompt_logprobs: list[dict | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.generator = None                    # torch.Generator when params.seed is set
        self.detok = None                        # IncrementalDetokenizer, set by the engine
        self.grammar = None                      # xgrammar matcher with structured outputs
        # JSON with free whitespace: the whitespace characters its output ends in (written by
        # engine/structured.py, which caps the run); None otherwise
        self.grammar_whitespace: int | None = None
        self.has_placeholder = False             # token_ids[-1] is PLACEHOLDER_TOKEN
        # LoRA (hpcinfer/lora): the request's adapter; lora_id 0 is the base model. Set by the
        # engine at add_request; the scheduler and the prefix-cache hash read lora_id.
        self.lora_request = None
        self.lora_id = 0
        # Images (hpcinfer/multimodal): the request's MultiModalInputs, shared by its n
        # sequences; set by the engine at add_request. None for text-only prompts.
        self.mm_inputs = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def add_placeholder(self) -> None:
        """Stand in for a token sampled on the device but not read yet (engine/inflight.py)."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        self.has_placeholder = True

    def drop_placeholder(self) -> None:
        """Remove the stand-in (before its real token is appended, or when it is dropped)."""
        if self.has_placeholder:
            self.token_ids.pop()
            self.has_placeholder = False

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def max_prefix_hit_tokens(self) -> int:
        """How many leading tokens the prefix cache may supply: all but the last (it must be
        computed for the logits), and none whose logits still owe a prompt logprob."""
        if self.needs_prompt_logprobs:
            return len(self.prompt_logprobs) - 1  # entry i comes from position i - 1's logits
        return len(self.token_ids) - 1

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(request={self.request_id!r}, index={self.index}, len={len(self)}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
