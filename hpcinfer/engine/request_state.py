"""RequestState: one request inside LLMEngine (its n or best_of sequences, metrics) and the
RequestOutput it shows the caller (cumulative, delta or final; best_of ranked)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hpcinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hpcinfer.engine.params import RequestOutputKind, SamplingParams
from hpcinfer.engine.sequence import Sequence


@dataclass
class RequestState:
    """Written by LLMEngine only."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    # RequestOutputKind.DELTA: (tokens, characters) of each completion already returned
    sent: dict[int, tuple[int, int]] = field(default_factory=dict)
    sent_prompt_logprobs: bool = False  # DELTA: they go out once, with the first output

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def streams(self) -> bool:
        """Whether unfinished states are returned (best_of ranks only finished samples)."""
        return (self.params.output_kind is not RequestOutputKind.FINAL_ONLY
                and len(self.seqs) == self.params.n)

    def output(self) -> RequestOutput:
        """The request as the caller sees it now; with DELTA, records what it has been shown."""
        seqs, params = self.seqs, self.params
        if len(seqs) > params.n:  # best_of: the n samples with the highest cumulative logprob
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[:params.n]
        completions = [self._completion(index, s) for index, s in enumerate(seqs)]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             self.finished, prompt_logprobs=self._prompt_logprobs(),
                             metrics=self.metrics, num_cached_tokens=seqs[0].num_cached_tokens)

    def _prompt_logprobs(self) -> list | None:
        collected = self.seqs[0].prompt_logprobs  # the first sequence collects them
        if collected is None:
            return None
        if self.params.output_kind is RequestOutputKind.DELTA:
            # As vLLM: all at once when complete (n > 1: another sample may come first).
            if self.sent_prompt_logprobs or self.seqs[0].needs_prompt_logprobs:
                return []
            self.sent_prompt_logprobs = True
        return list(collected)

    def _completion(self, index: int, seq: Sequence) -> CompletionOutput:
        text, token_ids = seq.detok.output_text, seq.output_token_ids
        # best_of samples carry logprobs for the ranking; shown only if they were asked for
        logprobs = list(seq.logprobs) if self.params.logprobs is not None else None
        if self.params.output_kind is RequestOutputKind.DELTA:
            num_tokens, num_chars = self.sent.get(index, (0, 0))
            self.sent[index] = (len(token_ids), len(text))
            text, token_ids = text[num_chars:], token_ids[num_tokens:]
            logprobs = logprobs[num_tokens:] if logprobs is not None else None
        return CompletionOutput(
            index=index, text=text, token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
