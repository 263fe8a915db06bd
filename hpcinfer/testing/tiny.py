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
}
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
        raise ValueError(f"unknown tiny family {family!r}; choose one of {list(TINY_FAMILIES)}")
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
                          num_shards_min: int = 3, **config_overrides: Any) -> Path:
    """Write a random fp32 ``family`` checkpoint (>= num_shards_min safetensors shards plus
    model.safetensors.index.json), its config and a tokenizer with a chat template to out_dir.
    Returns out_dir. ``config_overrides`` go to the HF config (e.g. ``sliding_window=8``)."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    config = tiny_config(family, len(tokenizer), **config_overrides)
    with torch.random.fork_rng():  # from_config draws from the global RNG: leave it untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    redraw_weights(model, seed, norm_offset=1.0 if config.model_type == "gemma" else 0.0)
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
