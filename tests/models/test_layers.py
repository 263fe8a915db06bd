"""Layer-level checks: rope math against transformers, TP weight slicing, attention backends."""
from __future__ import annotations

import pytest
import torch

from hpcinfer.kernels import reference
from hpcinfer.layers.attention import (Attention, AttentionMetadata, TorchRefAttentionBackend,
                                       get_attention_backend)
from hpcinfer.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hpcinfer.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                    QKVParallelLinear, RowParallelLinear, TensorParallel,
                                    WeightShapeError)
from hpcinfer.layers.rotary import (attention_factor_of, build_cos_sin_cache,
                                    dynamic_inverse_frequencies, get_rope, inverse_frequencies,
                                    max_position_of, rope_parameters_of)
from hpcinfer.testing.batch import allocate_kv_caches, assign_block_tables, build_batch


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
])
def test_inverse_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=dict(rope))
    params = rope_parameters_of(config)
    if rope["rope_type"] == "default":
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(params, 128), expected, rtol=0, atol=0)


def test_old_style_rope_scaling_config_is_read():
    class Old:  # transformers 4.x fields
        rope_theta = 500000.0
        rope_scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    params = rope_parameters_of(Old())
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0


def test_unsupported_rope_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match="proportional.*default.*llama3.*yarn.*longrope.*dynamic"):
        inverse_frequencies({"rope_type": "proportional", "rope_theta": 1e4, "factor": 4.0}, 64)


def _hf_rope(config_cls, rope: dict, **config_kwargs):
    """(our params, transformers' config) for one rope dict."""
    config = config_cls(hidden_size=512, num_attention_heads=4, max_position_embeddings=2048,
                        rope_parameters=dict(rope), **config_kwargs)
    return rope_parameters_of(config), config


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 256,
     "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
     "mscale_all_dim": 0.7, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.3,
     "original_max_position_embeddings": 512, "partial_rotary_factor": 0.5},
])
def test_yarn_frequencies_and_attention_factor_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params, config = _hf_rope(LlamaConfig, rope)
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(params, 128), expected, rtol=0, atol=0)
    assert attention_factor_of(params) == expected_factor


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("given_factor", [None, 1.25])
def test_longrope_tables_and_attention_factor_equal_transformers(partial, given_factor):
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    half = int(128 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)]}
    if given_factor is not None:
        rope["attention_factor"] = given_factor
    params, config = _hf_rope(Phi3Config, rope, original_max_position_embeddings=256)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=257)
    torch.testing.assert_close(inverse_frequencies(params, 128), short, rtol=0, atol=0)
    torch.testing.assert_close(inverse_frequencies(params, 128, long=True), long, rtol=0, atol=0)
    assert attention_factor_of(params) == factor
    # Rows: the short table for positions < 256, then the long one for every position.
    cache = build_cos_sin_cache(params, 128, 2048)
    assert cache.shape == (256 + 2048, 2 * half)
    angles = torch.tensor([300.0])[:, None] * long[None]
    torch.testing.assert_close(cache[256 + 300], torch.cat((angles.cos(), angles.sin()), -1)[0]
                               * factor, rtol=0, atol=0)


def test_dynamic_rows_use_the_length_transformers_uses_at_each_position():
    """Row p holds what transformers computes in a forward whose longest position is p."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params, config = _hf_rope(LlamaConfig, {"rope_type": "dynamic", "rope_theta": 10000.0,
                                            "factor": 2.0})
    config.max_position_embeddings = 64
    params["max_position_embeddings"] = 64
    rows = dynamic_inverse_frequencies(params, 128, 128)
    init, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu")
    for position in (0, 62, 63):
        torch.testing.assert_close(rows[position], init, rtol=0, atol=0)
    for position in (64, 65, 100, 127):
        grown, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu",
                                                  seq_len=torch.tensor(position + 1))
        torch.testing.assert_close(rows[position], grown, rtol=0, atol=0)
    assert not torch.equal(rows[64], rows[63])
    assert max_position_of(config) == 128  # 64 x factor: what the engine allows


def test_yarn_extends_the_length_the_engine_allows():
    from transformers import Qwen2Config
    config = Qwen2Config(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert max_position_of(config) == 131072


def test_gemma3_local_and_global_ropes_are_read_per_layer_type():
    from transformers import Gemma3TextConfig
    config = Gemma3TextConfig(rope_scaling={"rope_type": "linear", "factor": 8.0},
                              rope_local_base_freq=10000.0, rope_theta=1e6)
    local = rope_parameters_of(config, "sliding_attention")
    global_ = rope_parameters_of(config, "full_attention")
    assert (local["rope_type"], local["rope_theta"]) == ("default", 10000.0)
    assert (global_["rope_type"], global_["rope_theta"], global_["factor"]) == ("linear", 1e6, 8.0)


def test_partial_rotary_leaves_the_other_channels_alone():
    rope = get_rope(type("Config", (), {"rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "max_position_embeddings": 32})(), 64, 32)
    rope.init_buffers()
    assert rope.rotary_dim == 16 and rope.cos_sin_cache.shape == (32, 16)
    q, k = _full((5, 2, 64), 1), _full((5, 1, 64), 2)
    q_rot, k_rot = rope(torch.arange(5) + 3, q, k)
    assert torch.equal(q_rot[..., 16:], q[..., 16:]) and torch.equal(k_rot[..., 16:], k[..., 16:])
    assert not torch.allclose(q_rot[..., :16], q[..., :16])


def _full(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp_size", [1, 2])
def test_tp_weight_loaders_take_this_ranks_slice(tp_size):
    x = _full((3, 8), 0)
    q, k, v = _full((8, 8), 1), _full((4, 8), 2), _full((4, 8), 3)   # 4 heads, 2 kv heads, dim 2
    gate, up, down = _full((6, 8), 4), _full((6, 8), 5), _full((8, 6), 6)
    qkv_out, gate_up_out, row_out = [], [], torch.zeros(3, 8)
    for rank in range(tp_size):
        tp = TensorParallel(rank, tp_size)
        qkv = QKVParallelLinear(8, 2, 4, 2, bias=False, tp=tp)
        for shard, w in zip("qkv", (q, k, v)):
            qkv.weight_loader(qkv.weight, w, shard)
        q_part, k_part, v_part = qkv(x).split([8 // tp_size, 4 // tp_size, 4 // tp_size], -1)
        qkv_out.append((q_part, k_part, v_part))
        merged = MergedColumnParallelLinear(8, [6, 6], tp=tp)
        merged.weight_loader(merged.weight, gate, 0)
        merged.weight_loader(merged.weight, up, 1)
        gate_up_out.append(merged(x).chunk(2, -1))
        row = RowParallelLinear(6, 8, tp=tp)
        row.weight_loader(row.weight, down)
        # No process group here: sum the ranks' partial products by hand.
        row_out += torch.nn.functional.linear(x[:, :6].chunk(tp_size, -1)[rank], row.weight)
    torch.testing.assert_close(torch.cat([p[0] for p in qkv_out], -1), x @ q.T)
    torch.testing.assert_close(torch.cat([p[1] for p in qkv_out], -1), x @ k.T)
    torch.testing.assert_close(torch.cat([p[2] for p in qkv_out], -1), x @ v.T)
    torch.testing.assert_close(torch.cat([p[0] for p in gate_up_out], -1), x @ gate.T)
    torch.testing.assert_close(torch.cat([p[1] for p in gate_up_out], -1), x @ up.T)
    torch.testing.assert_close(row_out, x[:, :6] @ down.T)


def test_weight_loaders_reject_wrong_shapes():
    layer = ColumnParallelLinear(8, 6, bias=True)
    with pytest.raises(WeightShapeError, match=r"expected shape \(6, 8\), found \(6, 7\)"):
        layer.weight_loader(layer.weight, torch.zeros(6, 7))
    qkv = QKVParallelLinear(8, 2, 4, 2, bias=True)
    with pytest.raises(WeightShapeError):
        qkv.weight_loader(qkv.bias, torch.zeros(8), "k")
    # More ranks than KV heads: each KV head is replicated on tp / num_kv_heads ranks ...
    replicated = QKVParallelLinear(8, 2, 4, 2, tp=TensorParallel(0, 4))
    assert (replicated.num_kv_heads, replicated.kv_replicas) == (1, 2)
    # ... which only works when the rank count is a multiple of the KV heads.
    with pytest.raises(ValueError, match="not a multiple of it"):
        QKVParallelLinear(8, 2, 6, 4, tp=TensorParallel(0, 6))


def test_vocab_parallel_embedding_and_head_slices():
    table = _full((10, 4), 7)
    ids = torch.tensor([0, 4, 5, 9])
    for rank in range(2):
        emb = VocabParallelEmbedding(10, 4, TensorParallel(rank, 2))
        emb.weight_loader(emb.weight, table)
        torch.testing.assert_close(emb.weight, table[rank * 5:(rank + 1) * 5])
    head = ParallelLMHead(10, 4)
    head.weight_loader(head.weight, table)
    h = _full((2, 4), 8)
    torch.testing.assert_close(head.compute_logits(h), h @ table.T)
    torch.testing.assert_close(torch.nn.functional.embedding(ids, head.weight), table[ids])


def test_backend_selection():
    assert get_attention_backend("auto", "cpu").name == "torch_ref"
    assert get_attention_backend("auto").name == "torch_ref"
    assert get_attention_backend("torch_ref").name == "torch_ref"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*torch_ref"):
        get_attention_backend("flash")


def test_padding_slots_are_not_written_and_attention_matches_reference():
    """A decode batch padded with a -1 slot (as CUDA-graph batches are): the padding row must
    not touch the cache; the real rows equal the reference paged attention."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    tables = assign_block_tables([6, 3], block)
    (k_cache, v_cache), = allocate_kv_caches(1, 1 + sum(len(t) for t in tables), block,
                                             kv_heads, dim)
    k_cache.zero_(), v_cache.zero_()
    seqs = [list(range(6)), list(range(3))]
    batch = build_batch(seqs, tables, block, num_computed=[5, 2])
    meta = batch.meta
    padded = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        cu_seqlens_q=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
        seq_lens=torch.cat([meta.seq_lens, torch.tensor([1], dtype=torch.int32)]),
        block_tables=torch.cat([meta.block_tables, torch.zeros(1, meta.block_tables.shape[1],
                                                               dtype=torch.int32)]),
        max_seqlen_q=1, max_seqlen_k=meta.max_seqlen_k, is_decode=True)
    q = torch.randn(3, heads, dim, generator=gen)
    k = torch.randn(3, kv_heads, dim, generator=gen)
    v = torch.randn(3, kv_heads, dim, generator=gen)
    attn = Attention(heads, kv_heads, dim, dim ** -0.5, backend=TorchRefAttentionBackend())
    out = attn(q, k, v, (k_cache, v_cache), padded)
    assert out.shape == (3, heads * dim)
    assert k_cache[0].abs().sum() == 0 and v_cache[0].abs().sum() == 0  # padding block 0 untouched
    expected = reference.paged_attention(q[:2], k_cache, v_cache, meta.cu_seqlens_q,
                                         meta.seq_lens, meta.block_tables, dim ** -0.5)
    torch.testing.assert_close(out[:2], expected.reshape(2, -1))
