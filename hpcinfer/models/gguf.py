"""GGUF files (llama.cpp's format) as checkpoints: ``LLM(model="path/model.Q4_K_M.gguf")``, as
vLLM takes them.

There is no GGUF kernel: transformers dequantizes the file (``gguf_file=``, with the ``gguf``
package) and the result is written once as a plain safetensors checkpoint (config, weights,
tokenizer, chat template) in a per-user cache, which the engine then loads like any other
directory. The weights are float32 (what transformers dequantizes to: exact for every GGUF
quantization type); the engine casts them to its dtype at load, so a GGUF model runs at the
speed and memory of the unquantized one. Which architectures work is transformers' GGUF
list (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ... : ``transformers.integrations.ggml``)
intersected with ours.

Cache: ``$HPCINFER_GGUF_CACHE`` or ``~/.cache/hpcinfer/gguf``, one directory per file, keyed by
its absolute path, size and modification time (hashing a multi-GB file at every start would
cost more than the check is worth). A build goes to a temporary directory beside it and is
renamed into place under a lock, so concurrent processes (the ranks of a job) build once and
never read half a checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hpcinfer.utils.file_lock import exclusive

log = logging.getLogger(__name__)

CACHE_ENV = "HPCINFER_GGUF_CACHE"
COMPLETE = "GGUF_SOURCE.json"   # written last: a directory without it is a leftover


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "hpcinfer" / "gguf"


def gguf_checkpoint(gguf_path: str | Path) -> Path:
    """The plain checkpoint directory of ``gguf_path``, converted on first use."""
    path = Path(os.path.expanduser(str(gguf_path))).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / f"{path.stem}-{key[:16]}"
    if (target / COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(target.parent / f".{target.name}.lock"):
        if not (target / COMPLETE).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                log.info("converting %s to a checkpoint in %s (once)", path, target)
                convert_gguf(path, tmp)
                (tmp / COMPLETE).write_text(json.dumps(
                    {"gguf": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
                    indent=2) + "\n")
                if target.exists():   # an incomplete leftover of a killed build
                    shutil.rmtree(target)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, *, generation_config: dict | None = None,
                 max_shard_size: str = "5GB") -> None:
    """Dequantize ``gguf_path`` with transformers into an fp32 checkpoint in ``out_dir``
    (sharded safetensors, config, tokenizer with its chat template, generation_config)."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{gguf_path.name}: reading a GGUF file needs the `{module}` "
                             f"package (transformers dequantizes GGUF with it): run "
                             f"`pip install gguf accelerate`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    src, name = gguf_path.parent, gguf_path.name
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name,
                                                          dtype=torch.float32)
    except Exception as exc:   # any reader failure: one message saying what to do
        raise ValueError(f"{gguf_path}: transformers cannot read this GGUF file ({exc}); its "
                         "architecture may be one transformers does not dequantize: convert "
                         "it to a safetensors checkpoint with the tool that made it") from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):   # the saved model is plain fp32
        del config.quantization_config
    config._name_or_path = ""                    # the GGUF's title, not a path
    # transformers 5 refuses save_pretrained on a GGUF-loaded model: copy into a plain one
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if generation_config is not None:
        plain.generation_config = GenerationConfig(**generation_config)
    plain.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del plain
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out_dir)
