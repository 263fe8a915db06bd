"""vLLM's ``hf_overrides``: changes to the checkpoint's HF config (rope scaling, a longer
context, ...) without editing the snapshot, which is often shared and read-only.

The model loader and the tokenizer read the checkpoint directory, so the overrides are applied
to a private overlay of it: a temporary directory (unique per LLM, removed at exit) whose
entries are symlinks to the snapshot's files except config.json, written with the overrides.
"""
from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def with_hf_overrides(model_path: str, hf_overrides: dict | Callable | None) -> str:
    """``model_path`` itself when there is nothing to override, else the overlay directory.

    hf_overrides: a dict merged into config.json (nested dicts merge key by key), or a
    callable taking and returning the transformers PretrainedConfig (vLLM's two forms)."""
    if not hf_overrides:
        return model_path
    source = Path(model_path)
    if not (source / "config.json").is_file():
        raise ValueError(f"hf_overrides: {model_path} has no config.json to override")
    config = _overridden_config(source, hf_overrides)
    overlay = Path(tempfile.mkdtemp(prefix="hpcinfer-hf-overrides-"))
    atexit.register(shutil.rmtree, overlay, ignore_errors=True)
    for entry in source.iterdir():
        if entry.name != "config.json":
            (overlay / entry.name).symlink_to(entry.resolve())
    (overlay / "config.json").write_text(json.dumps(config, indent=2))
    log.info("hf_overrides applied: loading %s through %s", model_path, overlay)
    return str(overlay)


def _overridden_config(source: Path, hf_overrides) -> dict:
    if isinstance(hf_overrides, dict):
        return merge_overrides(json.loads((source / "config.json").read_text()), hf_overrides)
    if callable(hf_overrides):
        from transformers import AutoConfig
        config = hf_overrides(AutoConfig.from_pretrained(source))
        if config is None:
            raise ValueError("hf_overrides: the callable returned None; return the config")
        return config.to_dict()
    raise ValueError(f"hf_overrides={hf_overrides!r}: pass a dict of config.json keys or a "
                     "callable that takes and returns the HF config")


def merge_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    """``base`` with ``overrides`` on top; nested dicts (rope_scaling, ...) merge key by key.
    Also the login side's (compile/checkpoint.py checks a job's model.hf_overrides): this
    module imports no torch or transformers at its top."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = value
    return merged
