"""Tiny random pooling checkpoints for tests: BERT / XLM-RoBERTa encoders, decoder classifiers.

``build_tiny_pooling_checkpoint(kind, out_dir)`` writes one; ``tiny_pooling_checkpoint(kind)``
builds each kind once per process under a temporary directory (removed at exit). Kinds:

- ``bert``, ``xlm-roberta``: ``BertModel`` / ``XLMRobertaModel`` (embedding models) with a
  WordPiece tokenizer; ``sentence_transformers=True`` adds ``modules.json``,
  ``1_Pooling/config.json`` (mean pooling) and a ``Normalize`` module, as real
  sentence-transformers checkpoints have.
- ``bert-cls``, ``xlm-roberta-cls``: ``*ForSequenceClassification`` cross-encoders
  (``num_labels`` from ``config_overrides``, default 3).
- ``<family>-cls`` for family in llama, mistral, qwen2, qwen3, gemma:
  ``*ForSequenceClassification`` on a decoder body, with the tiny BPE tokenizer of
  ``hpcinfer.testing.tiny``.
- ``<family>-embed``: the bare decoder (``LlamaModel`` ...), a last-token embedding model.

Weights are re-drawn as in ``hpcinfer.testing.tiny`` (norms around 1, non-zero biases).
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hpcinfer.testing.tiny import _FAMILY_CONFIGS, _tiny_tokenizer, redraw_weights, tiny_config

ENCODER_KINDS = ("bert", "xlm-roberta")
DECODER_CLS_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a cluster schedules jobs with slurm and each job asks for nodes gpus and time",
    "batch inference reads prompts from jsonl or parquet and writes the answers back",
    "paged attention keeps keys and values in fixed size blocks of the kv cache",
    "hello world how are you today i am fine thank you very much",
    "what is the capital of france paris is the capital of france",
    "embeddings of passages let researchers search millions of documents",
]

_ENCODER_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128,
                       hidden_act="gelu", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)


def _wordpiece_tokenizer(kind: str):
    """A WordPiece tokenizer trained on a tiny corpus; BERT ([CLS] a [SEP] b [SEP], token
    types 0/1) or XLM-R style (<s> a </s></s> b </s>, token types all 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pad, unk, cls, sep, mask = specials
    else:  # XLM-R: <s>=0, <pad>=1, </s>=2, <unk>=3 as in the real vocabulary
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls, pad, sep, unk, mask = specials
    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                        show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    cls_id, sep_id = tok.token_to_id(cls), tok.token_to_id(sep)
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, cls_id), (sep, sep_id)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, cls_id), (sep, sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep,
        mask_token=mask, model_input_names=(["input_ids", "token_type_ids", "attention_mask"]
                                            if kind == "bert" else
                                            ["input_ids", "attention_mask"]))




def _encoder_model(kind: str, tokenizer, classifier: bool, overrides: dict):
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    model_type = "bert" if kind == "bert" else "xlm-roberta"
    kwargs = {**_ENCODER_COMMON, "vocab_size": len(tokenizer),
              "pad_token_id": tokenizer.pad_token_id,
              "type_vocab_size": 2 if kind == "bert" else 1}
    if classifier:
        kwargs["num_labels"] = 3
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    cls = AutoModelForSequenceClassification if classifier else AutoModel
    return cls.from_config(config)


def _decoder_model(family: str, tokenizer, classifier: bool, overrides: dict):
    from transformers import AutoModel, AutoModelForSequenceClassification

    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown decoder family {family!r}; choose one of "
                         f"{list(DECODER_CLS_FAMILIES)}")
    if classifier:
        overrides = {"num_labels": 3, **overrides}
    config = tiny_config(family, len(tokenizer), **overrides)
    cls = AutoModelForSequenceClassification if classifier else AutoModel
    return cls.from_config(config)


def build_tiny_pooling_checkpoint(kind: str, out_dir: str | Path, *, seed: int = 0,
                                  sentence_transformers: bool = False,
                                  pooling_mode: str = "mean",
                                  **config_overrides: Any) -> Path:
    """Write a random fp32 pooling checkpoint of ``kind`` (see the module docstring) with its
    tokenizer to out_dir; returns out_dir. ``sentence_transformers`` adds modules.json and
    1_Pooling/config.json with ``pooling_mode`` (mean, cls or lasttoken) and Normalize."""
    import torch

    out_dir = Path(out_dir)
    classifier = kind.endswith("-cls")
    base = kind.removesuffix("-cls").removesuffix("-embed")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if base in ENCODER_KINDS:
            tokenizer = _wordpiece_tokenizer(base)
            model = _encoder_model(base, tokenizer, classifier, config_overrides)
        elif base in DECODER_CLS_FAMILIES and (classifier or kind.endswith("-embed")):
            tokenizer = _tiny_tokenizer()
            model = _decoder_model(base, tokenizer, classifier, config_overrides)
        else:
            raise ValueError(f"unknown tiny pooling kind {kind!r}: use bert, xlm-roberta, "
                             "bert-cls, xlm-roberta-cls, <family>-cls or <family>-embed for "
                             f"family in {list(DECODER_CLS_FAMILIES)}")
    redraw_weights(model, seed, norm_offset=1.0 if base == "gemma" else 0.0)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if sentence_transformers:
        write_sentence_transformers_files(out_dir, model.config.hidden_size, pooling_mode)
    return out_dir


def write_sentence_transformers_files(out_dir: str | Path, hidden_size: int,
                                      pooling_mode: str = "mean", normalize: bool = True) -> None:
    """modules.json (Transformer, Pooling[, Normalize]) and 1_Pooling/config.json."""
    out_dir = Path(out_dir)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2))
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "lasttoken": "pooling_mode_lasttoken"}
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": False}
    pooling[modes[pooling_mode]] = True
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    if normalize:
        (out_dir / "2_Normalize").mkdir(exist_ok=True)
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 128, "do_lower_case": False}))


@functools.lru_cache(maxsize=None)
def tiny_pooling_checkpoint(kind: str, sentence_transformers: bool = False) -> Path:
    """``build_tiny_pooling_checkpoint(kind, ...)`` once per process in a temp dir removed at
    exit. Treat it as read-only."""
    root = Path(tempfile.mkdtemp(prefix=f"hpcinfer-tinypool-{kind}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_pooling_checkpoint(kind, root / kind,
                                         sentence_transformers=sentence_transformers)


# --- transformers oracles (fp32, CPU, one unpadded sequence at a time) ---

def hf_hidden_states(model_dir: str | Path, texts: list, pairs: bool = False) -> list:
    """transformers' last hidden states [L, H] per text (or per (text_1, text_2) pair)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(*text, return_tensors="pt") if pairs else tok(text, return_tensors="pt")
            out.append(model(**enc).last_hidden_state[0])
    return out


def hf_embeddings(model_dir: str | Path, texts: list[str], pooling_type: str,
                  normalize: bool = True, dimensions: int | None = None) -> list:
    """Pooled (CLS / MEAN / LAST), truncated and normalized like vLLM, from transformers."""
    import torch.nn.functional as F

    index = {"CLS": lambda h: h[0], "LAST": lambda h: h[-1], "MEAN": lambda h: h.mean(0)}
    vecs = [index[pooling_type](h)[:dimensions] for h in hf_hidden_states(model_dir, texts)]
    return [F.normalize(v, dim=-1) if normalize else v for v in vecs]


def hf_logits(model_dir: str | Path, texts: list, pairs: bool = False) -> list:
    """transformers' sequence-classification logits [num_labels] per text or pair."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                               dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(*text, return_tensors="pt") if pairs else tok(text, return_tensors="pt")
            out.append(model(**enc).logits[0])
    return out


def hf_token_scores(model_dir: str | Path, texts: list[str]) -> list:
    """A decoder classifier's score head on every token: [L, num_labels] per text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.score(model.model(**tok(t, return_tensors="pt")).last_hidden_state)[0]
                for t in texts]


TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france",
    "paris is the capital of france",
    "a cluster schedules jobs with slurm and each job asks for nodes gpus and time",
    "embeddings",
]
