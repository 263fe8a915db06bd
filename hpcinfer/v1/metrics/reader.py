"""Metric types at vLLM's import path (``vllm.v1.metrics.reader``) and the snapshot of an
engine's statistics that ``LLM.get_metrics()`` returns, with vLLM's metric names.

vLLM reads these from its Prometheus registry; hpcinfer has no registry (no server), so the
snapshot is read straight from the engine's counters (LLMEngine.stats, the scheduler and the
block manager).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Metric:
    """A named metric with key=value labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing integer counter."""

    value: int


@dataclass
class Vector(Metric):
    """An ordered array of integer counters (vLLM uses it for speculative decoding only)."""

    values: list[int]


@dataclass
class Gauge(Metric):
    """A value that can go up or down."""

    value: float


@dataclass
class Histogram(Metric):
    """Observations in buckets: {upper bound: observations <= it}, "+Inf" always present."""

    count: int
    sum: float
    buckets: dict[str, int]


def engine_metrics(engine) -> list[Metric]:
    """vLLM-named metrics of one LLMEngine (labels: engine index and model name, as vLLM's)."""
    labels = {"model_name": str(engine.config.model), "engine": "0"}
    stats, scheduler = engine.stats, engine.scheduler
    bm = engine.block_manager
    metrics: list[Metric] = [
        Gauge("vllm:num_requests_running", dict(labels), float(len(scheduler.running))),
        Gauge("vllm:num_requests_waiting", dict(labels), float(len(scheduler.waiting))),
        Gauge("vllm:kv_cache_usage_perc", dict(labels), float(engine.kv_cache_usage)),
        Counter("vllm:num_preemptions", dict(labels), int(engine.num_preemptions)),
        Counter("vllm:prompt_tokens", dict(labels), int(stats.num_prompt_tokens)),
        Counter("vllm:generation_tokens", dict(labels), int(stats.num_generated_tokens)),
        Counter("vllm:prefix_cache_queries", dict(labels), int(bm.prefix_cache_queries)),
        Counter("vllm:prefix_cache_hits", dict(labels), int(bm.prefix_cache_hits)),
    ]
    for reason in ("stop", "length", "abort"):
        count = stats.requests.finished_by_reason.get(reason, 0)
        metrics.append(Counter("vllm:request_success", {**labels, "finished_reason": reason},
                               int(count)))
    for name, hist in (("vllm:time_to_first_token_seconds", stats.requests.time_to_first_token_s),
                       ("vllm:e2e_request_latency_seconds", stats.requests.e2e_latency_s),
                       ("vllm:request_prompt_tokens", stats.requests.prompt_tokens),
                       ("vllm:request_generation_tokens", stats.requests.generation_tokens)):
        metrics.append(Histogram(name, dict(labels), count=hist.count, sum=float(hist.sum),
                                 buckets=hist.cumulative_buckets()))
    return metrics
