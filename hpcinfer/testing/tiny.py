"""Tiny random HF checkpoints for tests: sharded safetensors, config, tokenizer, chat template.

``build_tiny_checkpoint(family, out_dir)`` writes one; ``tiny_checkpoint(family)`` builds each
family once per process under a temporary directory (removed at exit), which is what tests
should use. A pytest-session pattern works as well::

    @pytest.fixture(scope="session")
    def llama_dir(tmp_path_factory):
        return build_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))

Weights are re-drawn after ``from_config`` (norm weights around 1, biases non-zero, linear
layers at 1/sqrt(fan_in)) because transformers' init (std 0.02, norms exactly 1, biases 0)
hides bugs: a norm or bias we forgot to load would still match, and near-uniform logits make
greedy ties likely.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

TINY_FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "opt")

# Special tokens get ids 0..5 in this order; the configs below use these ids.
PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, "<|im_start|>", "<|im_end|>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKENIZER_VOCAB_SIZE = 384

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
               rms_norm_eps=1e-6, tie_word_embeddings=False)

# family -> (HF model_type, config kwargs on top of _COMMON)
_FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": ("llama", {
        "num_key_value_heads": 2,
        # original_max_position_embeddings=64 puts the low-, medium- and high-frequency bands
        # of a head_dim-16 rope all inside the positions tests reach.
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64},
    }),
    "mistral": ("mistral", {"num_key_value_heads": 2, "sliding_window": 32, "head_dim": 16}),
    "qwen2": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"num_key_value_heads": 2, "head_dim": 32}),
    "gemma": ("gemma", {"num_key_value_heads": 1, "head_dim": 32, "tie_word_embeddings": True,
                        "hidden_act": "gelu_pytorch_tanh"}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 32, "do_layer_norm_before": True,
                    "enable_bias": True, "tie_word_embeddings": True}),
    # Issue 17's families and rope types. Small caps and windows so capping and windows bite
    # at the lengths tests reach; head_dim != hidden / heads and a single KV head (MQA).
    "gemma2": ("gemma2", {
        "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 8.0, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": ("gemma3_text", {
        "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 20,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}),
    # Phi-3.5 style longrope at a tiny scale: original length 64 (prompts and generations
    # cross it), rotating half of each 16-channel head (4 factors per table).
    "phi3": ("phi3", {
        "num_key_value_heads": 2, "max_position_embeddings": 256,
        "original_max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.3, 2.1, 3.7],
                            "long_factor": [1.2, 2.9, 7.5, 19.0]}}),
    # Qwen2.5 style yarn (factor 4 over an original 64) with one KV head.
    "qwen2_yarn": ("qwen2", {
        "num_key_value_heads": 1, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64}}),
    # Dynamic NTK beyond 64 positions (the engine allows 64 x factor).
    "llama_dynamic": ("llama", {
        "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
}
# The families above added for issue 17, kept out of TINY_FAMILIES: the engine-wide
# parametrized tests run prompts (200 tokens, chunked prefill of prompts crossing longrope's
# switch) that these rope types define differently; tests/engine/test_greedy_new_families.py
# runs them under the conditions docs/models.md states.
TINY_NEW_FAMILIES = ("gemma2", "gemma3", "phi3", "qwen2_yarn", "llama_dynamic")
_NOT_FOR_OPT = ("intermediate_size", "num_key_value_heads", "rms_norm_eps")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cluster schedules jobs with Slurm; each job asks for nodes, GPUs and time.",
    "Batch inference reads prompts from JSONL or Parquet and writes the answers back.",
    "Paged attention keeps keys and values in fixed-size blocks of the KV cache.",
    "Hello, world! How are you today? I am fine, thank you very much.",
    "Numbers like 12345 and 67890 appear in text, as do dates like 2024-05-01.",
    "def main():\n    print('hello')\n    return 0\n",
    "Researchers on university clusters run millions of prompts through language models.",
]


def _tiny_tokenizer():
    """A ByteLevel BPE trained on a small in-memory corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    # Like Llama's tokenizer: plain encoding starts with BOS (chat templates write it
    # themselves, so chat prompts are encoded with add_special_tokens=False).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=SPECIAL_TOKENS[4:], chat_template=CHAT_TEMPLATE)


def tiny_config(family: str, vocab_size: int, **overrides: Any):
    """The HF config of a tiny ``family`` model (see TINY_FAMILIES)."""
    from transformers import AutoConfig

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of "
                         f"{list(TINY_FAMILIES + TINY_NEW_FAMILIES)}")
    model_type, extra = _FAMILY_CONFIGS[family]
    kwargs = {**_COMMON, **extra, "vocab_size": vocab_size, "pad_token_id": PAD_ID,
              "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **overrides}
    if model_type == "opt":
        kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_OPT}
    return AutoConfig.for_model(model_type, **kwargs)


def redraw_weights(model, seed: int, norm_offset: float = 0.0) -> None:
    """Seeded weights with real spread: from_config's init leaves norms at 1 and biases at 0,
    which would hide bugs in how those are applied, and makes greedy ties likelier.
    ``norm_offset=1.0`` for Gemma-style (1 + w) norms."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 2 and "embed" in name:
                param.copy_(noise)
            elif param.dim() == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            elif name.endswith(("norm.weight", "LayerNorm.weight")):  # BERT: LayerNorm
                param.copy_((1.0 - norm_offset) + 0.1 * noise)
            else:  # biases (and LayerNorm biases)
                param.copy_(0.1 * noise)


def build_tiny_checkpoint(family: str, out_dir: str | Path, *, seed: int = 0,
                          num_shards_min: int = 3, extra_tokens: tuple[str, ...] = (),
                          **config_overrides: Any) -> Path:
    """Write a random fp32 ``family`` checkpoint (>= num_shards_min safetensors shards plus
    model.safetensors.index.json), its config and a tokenizer with a chat template to out_dir.
    Returns out_dir. ``config_overrides`` go to the HF config (e.g. ``sliding_window=8``);
    ``extra_tokens`` are added to the tokenizer (and the vocabulary), e.g. a reranker's
    "yes" and "no"."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    if extra_tokens:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(list(extra_tokens))
    config = tiny_config(family, len(tokenizer), **config_overrides)
    with torch.random.fork_rng():  # from_config draws from the global RNG: leave it untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    is_gemma = config.model_type in ("gemma", "gemma2", "gemma3_text")  # norms x * (1 + w)
    redraw_weights(model, seed, norm_offset=1.0 if is_gemma else 0.0)
    model.eval()
    params = list(model.parameters())  # tied parameters appear once
    total = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    model.save_pretrained(out_dir, max_shard_size=max(largest, total // (2 * num_shards_min)))
    tokenizer.save_pretrained(out_dir)
    shards = set(json.loads((out_dir / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    if len(shards) < num_shards_min:
        raise RuntimeError(f"tiny {family} checkpoint has {len(shards)} shards, wanted "
                           f">= {num_shards_min}")
    return out_dir


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(family: str) -> Path:
    """``build_tiny_checkpoint(family, ...)`` once per process, in a temp dir removed at exit.

    Treat the directory as read-only: tests that modify a checkpoint (break a shard, edit
    config.json) must build their own with ``build_tiny_checkpoint``.
    """
    root = Path(tempfile.mkdtemp(prefix=f"hpcinfer-tiny-{family}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_checkpoint(family, root / family)


# Issue 21's MoE families, kept out of TINY_FAMILIES (tests/moe runs them). Odd expert counts,
# top-k 1/2/4, a shared expert, a dense first layer, a sparse step, and for gpt-oss sinks,
# alternating 8-token windows, yarn and a low swiglu_limit so the clamps bite.
TINY_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
_FAMILY_CONFIGS.update({
    "mixtral": ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 5,
                            "num_experts_per_tok": 2, "intermediate_size": 48}),
    "qwen2_moe": ("qwen2_moe", {
        "num_hidden_layers": 3, "num_key_value_heads": 2, "num_experts": 7,
        "num_experts_per_tok": 4, "moe_intermediate_size": 32, "intermediate_size": 96,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
        "mlp_only_layers": [0], "decoder_sparse_step": 1}),
    "qwen3_moe": ("qwen3_moe", {
        "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 6,
        "num_experts_per_tok": 1, "moe_intermediate_size": 32, "intermediate_size": 96,
        "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    "gpt_oss": ("gpt_oss", {
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 5,
        "max_position_embeddings": 256,
        # 2 * intermediate != hidden, so a transposed expert layout cannot load silently.
        "num_experts_per_tok": 2, "intermediate_size": 48, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 1.5,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                            "original_max_position_embeddings": 64}}),
})
