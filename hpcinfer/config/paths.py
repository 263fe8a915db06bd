"""Make every path in a validated config absolute (relative to the job file's directory).

Done once at load time so the resolved job.yaml, the rendered script and the worker all see the
same absolute paths, whatever directory they run in. ``~`` and ``$VAR`` are expanded on the login
node, where the user's environment is (``$SCRATCH``, ``$PROJECT`` on Alliance clusters).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hpcinfer.config.schema import JobConfig

_UNSET_VAR = re.compile(r"\$(\w+|\{[^}]*\})")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "$")


def _expand(cfg: JobConfig, key_path: str, text: str) -> str:
    expanded = os.path.expandvars(os.path.expanduser(text))
    unset = _UNSET_VAR.search(expanded)
    if unset:
        raise cfg.error_at(key_path, f"environment variable {unset.group(0)} is not set",
                           "export it before running hpcinfer, or write the path out")
    return expanded


def _absolute(base: Path, cfg: JobConfig, key_path: str, text: str) -> str:
    # normpath, not resolve(): keep glob characters and the user's symlinked paths as written.
    return os.path.normpath(base / _expand(cfg, key_path, text))


def is_local_model(model_id: str, base: Path) -> bool:
    """A model id names a local directory when it looks like a path or exists as one."""
    return model_id.startswith(_LOCAL_PREFIXES) or (base / model_id).is_dir()


def _bind(base: Path, cfg: JobConfig, key_path: str, spec: str) -> str:
    src, sep, rest = spec.partition(":")
    return _absolute(base, cfg, key_path, src) + sep + rest


def resolve_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """A copy of ``cfg`` with input globs, output dir, model/tokenizer dirs, LoRA adapter dirs,
    container image and bind sources absolute. ``output.dir`` null becomes ``results/<name>``."""
    paths = tuple(_absolute(base, cfg, f"input.path.{i}", p) for i, p in enumerate(cfg.input.path))
    out_dir = _absolute(base, cfg, "output.dir", cfg.output.dir or f"results/{cfg.name}")
    update: dict = {
        "input": cfg.input.model_copy(update={"path": paths, "media_dirs": tuple(
            _absolute(base, cfg, f"input.media_dirs.{i}", d)
            for i, d in enumerate(cfg.input.media_dirs))}),
        "output": cfg.output.model_copy(update={"dir": out_dir}),
        "model": cfg.model.model_copy(update=_model_update(cfg, base)),
        # A hub adapter id (org/name, no such directory here) stays as written: render pins
        # it to its downloaded snapshot (config/lora_checks.py resolve_job_adapters).
        "lora": cfg.lora.model_copy(update={"adapters": {
            name: _absolute(base, cfg, f"lora.adapters.{name}", path)
            if is_local_model(path, base) else path
            for name, path in cfg.lora.adapters.items()}}),
    }
    if cfg.container is not None:
        image = cfg.container.image
        if "://" not in image:
            image = _absolute(base, cfg, "container.image", image)
        binds = tuple(_bind(base, cfg, f"container.binds.{i}", b)
                      for i, b in enumerate(cfg.container.binds))
        update["container"] = cfg.container.model_copy(update={"image": image, "binds": binds})
    return cfg.model_copy(update=update)


def _model_update(cfg: JobConfig, base: Path) -> dict:
    update = {}
    for key in ("id", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and is_local_model(value, base):
            update[key] = _absolute(base, cfg, f"model.{key}", value)
    return update
