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


def moe_sizes(hf: dict) -> tuple[int, int] | None:
    """(num_experts, each expert's intermediate size) of a MoE config.json; None when dense.

    Mixtral and gpt-oss name them num_local_experts / intermediate_size, Qwen-MoE
    num_experts / moe_intermediate_size (its intermediate_size is the dense layers')."""
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    inter = hf.get("moe_intermediate_size") or hf.get("intermediate_size")
    if not isinstance(experts, int) or not isinstance(inter, int) or experts <= 0:
        return None
    return experts, inter


def expert_layout_problem(num_experts: int, expert_inter: int, tp: int,
                          expert_parallel: bool = False) -> str | None:
    """None if the experts split over ``tp`` ranks, else what is wrong and what to do. The
    engine raises the same refusal while building the model, before reading any weight."""
    if expert_parallel and num_experts % tp:
        return (f"expert parallelism over {tp} ranks cannot place the model's {num_experts} "
                f"experts evenly: use a tensor_parallel_size that divides {num_experts}, or "
                "turn enable_expert_parallel off")
    if not expert_parallel and expert_inter % tp:
        hint = (f", or enable_expert_parallel=True ({num_experts} experts split evenly)"
                if num_experts % tp == 0 else "")
        return (f"tensor_parallel_size={tp} does not divide each expert's intermediate size "
                f"{expert_inter}: use a divisor of it{hint}")
    return None


def weights_fit_problem(rank_weight_bytes: int, free_bytes: int, num_ranks: int,
                        has_experts: bool = False) -> str | None:
    """None if one rank's weights fit in its device's free memory, else how many GPUs the
    model needs. Checked on the meta-device model, so the refusal comes before any read.
    The estimate keeps 15% of each GPU for the KV cache and activations."""
    if rank_weight_bytes <= free_bytes:
        return None
    total = rank_weight_bytes * num_ranks
    needed = -(-total // max(int(free_bytes * 0.85), 1))
    how = ("tensor_parallel_size (with enable_expert_parallel=True for whole experts per GPU)"
           if has_experts else "tensor_parallel_size / pipeline_parallel_size")
    return (f"the weights need {rank_weight_bytes / 2**30:.1f} GiB per GPU with {num_ranks} "
            f"rank(s) but the GPU has {free_bytes / 2**30:.1f} GiB free: this model needs "
            f"about {needed} GPUs of this size; raise {how}, or pick a smaller dtype")
