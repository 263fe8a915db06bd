"""Where the Hugging Face cache and our download records live.

Computed from the environment at call time (not at import), the same way huggingface_hub does:
explicit `cache_dir` > HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE (legacy) > HF_HOME/hub >
$XDG_CACHE_HOME/huggingface/hub > ~/.cache/huggingface/hub. Nothing here imports huggingface_hub,
so workers can resolve models without it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def hub_cache_dir(cache_dir: str | os.PathLike | None = None,
                  environ: Mapping[str, str] | None = None) -> Path:
    """Absolute path of the HF hub cache (the folder holding `models--org--name/`)."""
    env = os.environ if environ is None else environ
    if cache_dir is not None:
        return _absolute(str(cache_dir))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return _absolute(env[key])
    if env.get("HF_HOME"):
        return _absolute(env["HF_HOME"]) / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return _absolute(xdg) / "huggingface" / "hub"


def repo_folder_name(model_id: str) -> str:
    """huggingface_hub's folder name for a model repo: `org/name` -> `models--org--name`."""
    return "models--" + model_id.replace("/", "--")


def records_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """`<hub cache>/hpcinfer/models`: one sub-folder per model, one JSON record per revision."""
    return hub_cache_dir(cache_dir) / "hpcinfer" / "models"


def _absolute(path: str) -> Path:
    # abspath, not resolve(): keep the user's spelling of a Lustre mount (symlinked /home ->
    # /lustre/...) stable in records and job files; resolve() would bake in the current target.
    return Path(os.path.abspath(os.path.expandvars(os.path.expanduser(path))))
