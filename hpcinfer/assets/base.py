"""Where vLLM's public example assets live on disk, and how they get there.

The cache is vLLM's own (``VLLM_ASSETS_CACHE``, default ``~/.cache/vllm/assets``), so an
asset a vLLM run downloaded before is found here too. A missing one is downloaded from vLLM's
public bucket; on a compute node without network, fetch it on the login node first (running
the same script there once is enough) or copy it into ``<cache>/vllm_public_assets/``.
"""
from __future__ import annotations

import os
import tempfile
import urllib.request
from functools import lru_cache
from pathlib import Path

VLLM_S3_BUCKET_URL = "https://vllm-public-assets.s3.us-west-2.amazonaws.com"
FETCH_TIMEOUT_S = 5 * 60


def get_cache_dir() -> Path:
    path = Path(os.environ.get("VLLM_ASSETS_CACHE")
                or Path.home() / ".cache" / "vllm" / "assets").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache
def get_vllm_public_assets(filename: str, s3_prefix: str | None = None) -> Path:
    """The cached file, downloaded from vLLM's public bucket first if missing."""
    directory = get_cache_dir() / "vllm_public_assets"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    if path.exists():
        return path
    url = f"{VLLM_S3_BUCKET_URL}/{s3_prefix + '/' if s3_prefix else ''}{filename}"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:
            out.write(r.read())
        os.replace(tmp, path)   # atomic: a half-written file is never found as the asset
    except OSError as e:
        os.unlink(tmp)
        raise FileNotFoundError(
            f"asset {filename} is not in {directory} and could not be downloaded from {url} "
            f"({e}): download it where there is network (e.g. the login node) into that "
            "directory, or set VLLM_ASSETS_CACHE to a cache that has it") from None
    return path
