"""Async scheduling: the step whose sampled tokens are still on the GPU.

Why: a synchronous step leaves the GPU idle while the host reads the tokens back, appends
them, detokenizes, checks stops, schedules and builds the next batch (~2-4 ms a step, a
third of a 1B model's decode step). With async scheduling the engine launches step N+1
*before* it reads step N's tokens:

  call c:  schedule S_c -> prepare S_c (its decode rows' input ids are gathered on the GPU
           from S_{c-1}'s sampled tokens) -> launch S_c's forward + sampling
           -> read S_{c-1}'s tokens (by then long done) -> append, detokenize, stop checks
           -> S_c's sampled sequences get a placeholder token

A placeholder (``PLACEHOLDER_TOKEN``) stands for a token that is sampled but not yet read:
it makes the scheduler give the sequence its next decode row. The host never reads it as a
token id: the runner replaces it on the device (``pending``), and it is popped before the
real token is appended through the engine's ordinary path, so every output, stop check and
finish reason is computed exactly as in a synchronous step.

Sequences that stop on a token (EOS, stop token, stop string) at step N have already been
scheduled for step N+1: that one row is wasted and its token dropped. A sequence whose
*length* ends it at step N (max_tokens, max_model_len) is known in advance and gets no
placeholder, so the scheduler skips it (nothing to compute) and no row is wasted.

Requests run async unless they need the last token read back first: logprobs or prompt
logprobs (read back a step later than asked), bad words of several tokens (matched against
the outputs on the host). Penalties run async: the sampler counts a row's token still in
flight from ``pending`` on the device (engine/penalties.py). Other requests make the engine
run synchronous steps while they are live (``async_safe``). Greedy and seeded rows give
exactly the synchronous outputs. Unseeded random rows draw from the engine's generator in
batch order, as in a synchronous step, but a wasted row takes its draws too, so their
samples differ from a synchronous engine's (run to run they are the same for the same seed
and inputs): unseeded samples depend on what shares the batch either way, which is why they
do not wait for the rows they share it with (until 2026-12-04 they made every step
synchronous, the common temperature > 0 job included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hpcinfer.engine.params import SamplingParams
from hpcinfer.engine.sequence import Sequence


def async_safe(params: SamplingParams) -> bool:
    """True if a sequence's tokens do not depend on reading the last one back first."""
    return (params.logprobs is None and params.prompt_logprobs is None
            and not params.reads_output_tokens)


@dataclass
class InFlight:
    """One launched step: its sampled sequences and their tokens (on the device)."""

    seqs: list[Sequence]                 # the step's sample_seqs, in row order
    tokens: torch.Tensor                 # [len(seqs)] int64 on the device
    host: torch.Tensor | None = None     # pinned copy, filled asynchronously (CUDA only)
    copied: torch.cuda.Event | None = None
    index: dict[int, int] = field(default_factory=dict)  # id(seq) -> row in tokens

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor,
               staging: PinnedTokens | None) -> InFlight:
        """Start the device-to-host copy of ``tokens`` without waiting for it."""
        flight = cls(seqs, tokens, index={id(s): i for i, s in enumerate(seqs)})
        if tokens.is_cuda and staging is not None:
            flight.host, flight.copied = staging.copy_async(tokens)
        return flight

    def token_list(self) -> list[int]:
        """The sampled tokens on the host (waits for the copy: the only sync of a step)."""
        if self.host is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.host.tolist()


class PinnedTokens:
    """Two pinned host buffers used in turn: step N+1's copy lands in one while step N's
    tokens are still to be read from the other."""

    def __init__(self, size: int):
        self._buffers = [torch.empty(size, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._turn = 0

    def copy_async(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        i, self._turn = self._turn, 1 - self._turn
        host = self._buffers[i][:tokens.numel()]
        host.copy_(tokens, non_blocking=True)
        self._events[i].record()
        return host, self._events[i]
