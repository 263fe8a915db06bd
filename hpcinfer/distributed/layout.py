"""Whether a model can be split over tensor x pipeline ranks. Pure Python: the engine checks it
before starting ranks, and `hpcinfer validate`/`render` check it on the login node from the
checkpoint's config.json, so a job that cannot start is refused before it queues."""
from __future__ import annotations


def layout_problem(num_heads: int, num_kv_heads: int | None, num_layers: int, tp: int,
                   pp: int) -> tuple[str, str] | None:
    """None if the split works, else (which setting is wrong, what is wrong and what to do)."""
    kv_heads = num_kv_heads or num_heads
    if num_heads % tp:
        return "tensor", (f"tensor_parallel_size={tp} does not divide the model's {num_heads} "
                          f"attention heads: use a divisor of {num_heads}")
    if kv_heads % tp and tp % kv_heads:
        return "tensor", (f"tensor_parallel_size={tp} and the model's {kv_heads} KV heads: one "
                          "must divide the other (KV heads are split, or replicated when there "
                          "are more ranks than KV heads)")
    if pp > num_layers:
        return "pipeline", (f"pipeline_parallel_size={pp} is more than the model's {num_layers} "
                            "layers")
    return None
