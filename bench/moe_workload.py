"""Workload C of bench/throughput.py: a Qwen3-30B-A3B-shaped MoE checkpoint (bf16, random)
and its bandwidth bound.

The checkpoint has Qwen3-MoE's real widths (hidden 2048, 32 heads of 128 with 4 KV heads,
q/k norms, 128 experts of intermediate 768, top 8, vocab 151936) and per-expert tensors named
as on the hub; ``--layers`` in throughput.py keeps fewer than its 48 layers when disk or time
is short (the bound is computed for the same layer count, so the percentage stays fair).

The bound is the project's: per decode step the weights that step touches are read once at
the measured copy bandwidth, plus each token's KV context, plus the prefill FLOPs at the
measured matmul rate. For a MoE step "the weights it touches" are the attention and router
weights plus the experts hit by any of its tokens: with B tokens each choosing k of E
experts, E * (1 - (1 - k/E)^B) of them on average (all 128 once B is past a hundred or so,
which is why batch decoding of a MoE streams nearly all of its weights every step).
"""
from __future__ import annotations

QWEN3_30B_A3B = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "head_dim": 128, "tie_word_embeddings": False, "rope_theta": 1000000.0}

MOE_SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B}


def is_moe(shape: dict) -> bool:
    return "num_experts" in shape


def moe_config_dict(shape: dict, *, max_position_embeddings: int) -> dict:
    """config.json of a Qwen3-MoE checkpoint of ``shape`` (every layer sparse)."""
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                hidden_act="silu", max_position_embeddings=max_position_embeddings,
                rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                norm_topk_prob=True, dtype="bfloat16", **shape)


def moe_layer_tensors(prefix: str, shape: dict, randn, norm):
    """The q/k norms, router and experts of one layer, by their hub names."""
    h, inter = shape["hidden_size"], shape["moe_intermediate_size"]
    yield prefix + "self_attn.q_norm.weight", norm(shape["head_dim"])
    yield prefix + "self_attn.k_norm.weight", norm(shape["head_dim"])
    yield prefix + "mlp.gate.weight", randn(shape["num_experts"], h, std=h ** -0.5)
    for e in range(shape["num_experts"]):
        for name, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h),
                                 ("down_proj", h, inter)):
            yield prefix + f"mlp.experts.{e}.{name}.weight", randn(rows, cols, std=cols ** -0.5)


def experts_hit(shape: dict, num_tokens: int) -> float:
    e, k = shape["num_experts"], shape["num_experts_per_tok"]
    return e * (1 - (1 - k / e) ** num_tokens)


def decode_batch_sizes(requests, max_num_seqs: int) -> list[int]:
    """Sequences in each decode step of an ideal continuous-batching engine: requests are
    admitted in order whenever a slot of ``max_num_seqs`` is free, every live sequence gets
    one token a step and leaves after its last. While requests wait the batch is full; once
    they are all admitted it drains, and the longest output sets the number of steps."""
    import heapq
    lengths = [o for _, o in requests]
    ends: list[int] = []       # the step after each live sequence's last token
    sizes: list[int] = []
    step = admitted = 0
    while admitted < len(lengths) or ends:
        while admitted < len(lengths) and len(ends) < max_num_seqs:
            heapq.heappush(ends, step + lengths[admitted])
            admitted += 1
        sizes.append(len(ends))
        step += 1
        while ends and ends[0] <= step:
            heapq.heappop(ends)
    return sizes


def moe_bound_output_tok_s(shape: dict, requests, max_num_seqs: int, rates: dict, *,
                           flat: bool = False) -> float:
    """The bound with each decode step's batch from ``decode_batch_sizes`` (a step of B
    sequences reads the experts B tokens hit). ``flat``: the earlier form, every step full
    (min(max_num_seqs, requests) sequences, num_out / that many steps); it overstates the
    bound whenever the batch drains (workload C: all 1000 prompts start together, outputs
    16-512 tokens, so an ideal engine runs 512 steps, not the flat form's 231)."""
    h, vocab, layers = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    heads, kv_heads, head_dim = (shape["num_attention_heads"], shape["num_key_value_heads"],
                                 shape["head_dim"])
    attn = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + shape["num_experts"] * h
    expert = 3 * h * shape["moe_intermediate_size"]
    head = vocab * h * (1 if shape["tie_word_embeddings"] else 2)
    num_out = sum(o for _, o in requests)
    batches: dict[int, int] = {}      # sequences in a step -> steps of that size
    if flat:
        batch = min(max_num_seqs, len(requests))
        batches[batch] = -(-num_out // batch)
    else:
        for size in decode_batch_sizes(requests, max_num_seqs):
            batches[size] = batches.get(size, 0) + 1
    decode_bytes = sum(count * 2 * (layers * (attn + experts_hit(shape, size) * expert) + head)
                       for size, count in batches.items())
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2
    kv_read = sum(o * len(p) + o * (o - 1) / 2 for p, o in requests) * kv_bytes_per_token
    num_in = sum(len(p) for p, _ in requests)
    active = layers * (attn + shape["num_experts_per_tok"] * expert) + vocab * h
    seconds = ((decode_bytes + kv_read) / rates["copy_bytes_per_s"]
               + 2 * num_in * active / rates["matmul_flops"])
    return num_out / seconds
