"""Llama checkpoints of real shapes (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B) for the
benchmarks and the GPU tests: the config.json fields every such checkpoint shares, and a
word-level tokenizer over the whole vocabulary. Used by bench/throughput.py (random weights
written shard by shard, or none: write_dummy_model for load_format="dummy") and
hpcinfer/testing/copy_model.py (weights trained in the test)."""
from __future__ import annotations

from pathlib import Path

# Real models' shapes (their config.json widths), and a tiny one for CPU plumbing runs.
SHAPES = {
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "tie_word_embeddings": True,
                     "rope_theta": 500000.0},
    "llama-3.1-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "tie_word_embeddings": False,
                     "rope_theta": 500000.0},
    # 70B: bench/throughput.py runs it W4A16 with load_format="dummy" (one H200: ~38 GiB of
    # 4-bit weights plus bf16 embeddings; bf16 would need 141 GB).
    "llama-3.1-70b": {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "tie_word_embeddings": False,
                      "rope_theta": 500000.0},
    "tiny": {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "tie_word_embeddings": False, "rope_theta": 500000.0},
}


def llama_config_dict(shape: dict, *, max_position_embeddings: int,
                      dtype: str = "bfloat16") -> dict:
    """config.json fields for a shape dict (vocab_size, hidden_size, intermediate_size,
    num_hidden_layers, heads, kv heads, tie_word_embeddings, rope_theta): Llama 3's
    bos/eos ids, RMSNorm eps and llama3 RoPE scaling."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                bos_token_id=128000, eos_token_id=128001, attention_bias=False,
                mlp_bias=False, head_dim=head_dim, dtype=dtype,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}, **shape)


# 4-bit quantization_config of a W4A16 checkpoint of these shapes (group 128, as the
# published AWQ / GPTQ builds of Llama 3.x use), for load_format="dummy" runs.
W4A16_CONFIGS = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
             "sym": True, "checkpoint_format": "gptq"},
}


def write_dummy_model(out_dir: Path, shape: dict, *, max_position_embeddings: int,
                      quantization: str | None = None, config: dict | None = None) -> Path:
    """config.json (with the W4A16_CONFIGS[quantization] quantization_config when given) and
    the word-level tokenizer, no weights: a model directory for load_format="dummy".
    ``config``: the config.json of another architecture instead of a Llama's (workload C's
    Qwen3-MoE); its vocab_size sizes the tokenizer."""
    import json
    out_dir = Path(out_dir)
    config = dict(config) if config is not None else llama_config_dict(
        shape, max_position_embeddings=max_position_embeddings)
    if quantization is not None:
        config["quantization_config"] = dict(W4A16_CONFIGS[quantization])
    text = json.dumps(config, indent=1)
    cfg_path = out_dir / "config.json"
    if (cfg_path.is_file() and cfg_path.read_text() == text
            and (out_dir / "tokenizer.json").is_file()):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_word_tokenizer(out_dir, config["vocab_size"])
    cfg_path.write_text(text)
    return out_dir


def write_word_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary ("w0" ... "w<vocab-1>"): detokenizing
    costs what a real one does per token, and every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = min(128000, vocab_size - 2), min(128001, vocab_size - 1)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"w{bos}",
                                   eos_token=f"w{eos}", pad_token="w0")
    fast.save_pretrained(str(out_dir))
