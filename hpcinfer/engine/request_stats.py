"""Per-request statistics the engine accumulates for ``LLM.get_metrics()``.

Fixed-bucket histograms (vLLM's bucket bounds), so a job of millions of rows keeps a few
hundred numbers, never one record per request.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# vLLM's buckets (vllm/v1/metrics/loggers.py).
LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                     50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                  2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)


@dataclass
class HistogramStat:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)   # per bucket, the last one is +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative_buckets(self) -> dict[str, int]:
        """Prometheus' shape: {upper bound: observations <= it}, ending with "+Inf"."""
        buckets, total = {}, 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            buckets[bound] = total
        return buckets


@dataclass
class RequestStats:
    """What finished requests add up to (written by LLMEngine only)."""

    finished_by_reason: dict[str, int] = field(default_factory=dict)
    time_to_first_token_s: HistogramStat = field(
        default_factory=lambda: HistogramStat(TTFT_BUCKETS_S))
    e2e_latency_s: HistogramStat = field(default_factory=lambda: HistogramStat(LATENCY_BUCKETS_S))
    prompt_tokens: HistogramStat = field(default_factory=lambda: HistogramStat(TOKEN_BUCKETS))
    generation_tokens: HistogramStat = field(default_factory=lambda: HistogramStat(TOKEN_BUCKETS))

    def record_finished(self, metrics, finish_reason: str, num_prompt_tokens: int,
                        num_generated_tokens: int) -> None:
        self.finished_by_reason[finish_reason] = self.finished_by_reason.get(finish_reason, 0) + 1
        if metrics.first_token_time is not None:
            self.time_to_first_token_s.observe(metrics.first_token_time - metrics.arrival_time)
        if metrics.finished_time is not None:
            self.e2e_latency_s.observe(metrics.finished_time - metrics.arrival_time)
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_generated_tokens)
