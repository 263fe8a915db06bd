"""vLLM's own offline example scripts, read from vLLM's source distribution on PyPI, for the
compatibility test (tests/compat/test_vllm_examples.py): they run with only ``vllm`` replaced
by ``hpcinfer`` in their imports. Nothing of vLLM is kept in this repository; the sdist is
downloaded once (pinned by version and sha256) into a per-user cache, like the real-model
packages.

    python -m hpcinfer.testing.vllm_sdist fetch      # dev/setup.sh runs this
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "0.11.0"
SHA256 = "f435a64c24e9c4178d657a76f8edd8548ddc444012f7d06a9f79ac3a6392bfae"
URL = ("https://files.pythonhosted.org/packages/82/5a/36d2351206f4d8d871b10780f874d03957985e08"
       f"298d430cc837723e07af/vllm-{VERSION}.tar.gz")
CACHE_ENV = "HPCINFER_VLLM_SDIST_CACHE"

# examples/offline_inference/... of the list that this vLLM release ships.
EXAMPLES = ("basic/basic.py", "basic/generate.py", "basic/chat.py", "basic/classify.py",
            "basic/embed.py", "basic/score.py", "basic/reward.py", "llm_engine_example.py",
            "prefix_caching.py", "metrics.py", "async_llm_streaming.py",
            "structured_outputs.py", "automatic_prefix_caching.py", "reproducibility.py",
            "multilora_inference.py", "context_extension.py", "simple_profiling.py",
            "vision_language.py", "pooling/qwen3_reranker.py",
            "lora_with_quantization_inference.py", "torchrun_example.py",
            "pooling/embed_matryoshka_fy.py")

_IMPORT = re.compile(r"^(\s*)(from|import) vllm\b", re.M)


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "hpcinfer" / "vllm-sdist"
    return base / f"vllm-{VERSION}.tar.gz"


def fetch() -> Path:
    """The cached sdist, downloaded from PyPI first if missing (sha256-checked, atomic)."""
    path = cache_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vllm-sdist.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL, timeout=120) as response:
            digest = hashlib.sha256()
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != SHA256:
            raise RuntimeError(f"{URL}: sha256 {digest.hexdigest()} is not the pinned {SHA256}")
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def swap_imports(source: str) -> str:
    """``from vllm...`` / ``import vllm...`` -> hpcinfer; nothing else changes."""
    return _IMPORT.sub(r"\1\2 hpcinfer", source)


def write_examples(dest: Path) -> dict[str, Path]:
    """Extract EXAMPLES from the sdist into ``dest`` (same relative paths) with their imports
    swapped; returns {example: written path}."""
    prefix = f"vllm-{VERSION}/examples/offline_inference/"
    written = {}
    with tarfile.open(fetch()) as tar:
        for name in EXAMPLES:
            source = tar.extractfile(prefix + name).read().decode()
            out = Path(dest) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(swap_imports(source))
            written[name] = out
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m hpcinfer.testing.vllm_sdist fetch")
    print(fetch())
