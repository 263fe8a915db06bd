"""Model resolution at render time: a hub id becomes the snapshot path `hpcinfer download` recorded.

`render`, `submit` and `run --local` write the result into the resolved job.yaml, so the worker
loads from an absolute directory and never has a reason to contact the hub:

    model.id         /<hub cache>/models--org--name/snapshots/<commit>   (absolute snapshot dir)
    model.revision   <commit>                                            (the pinned sha)
    model.source_id  org/name                                            (what the job file said)

A local directory (`./ckpt`, `/abs/dir`) is left exactly as it is. A hub id with no download
record stops the render with "run `hpcinfer download ID` on the login node first" (a
ConfigError pointing at model.id, exit 2), unless `download=True` (`--download`) fetches it.
Pure login side: the hub client is imported only when a download really runs.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def resolve_job_model(cfg, *, download: bool = False):
    """`cfg` with model.id (and a hub-id model.tokenizer) pinned to recorded snapshot paths.

    Returns the same config when there is nothing to resolve (local directories). Raises
    ConfigError (via cfg.error_at) for a model that is not downloaded, or whose download fails.
    """
    model = cfg.model
    update: dict = {}
    if not _is_local(model.id):
        resolved = _resolve(cfg, "model.id", model.id, model.revision, download)
        update.update(id=resolved.path, revision=resolved.commit, source_id=model.id)
        log.info("model %s -> %s (commit %s)", model.id, resolved.path, resolved.commit)
    if model.tokenizer and model.tokenizer != model.id and not _is_local(model.tokenizer):
        update["tokenizer"] = _resolve(cfg, "model.tokenizer", model.tokenizer, None, download).path
    if update:
        cfg = cfg.model_copy(update={"model": model.model_copy(update=update)})
    from hpcinfer.config.lora_checks import resolve_job_adapters
    cfg = resolve_job_adapters(cfg, download=download)   # hub LoRA adapters -> snapshots
    check_parallel_layout(cfg)
    return cfg


def check_parallel_layout(cfg) -> None:
    """Refuse a checkpoint the engine cannot load, or cannot split over parallel.tensor /
    pipeline (compile/checkpoint.py); skipped while the model dir has no config.json."""
    from hpcinfer.compile.checkpoint import check_checkpoint
    check_checkpoint(cfg)


def _is_local(value: str) -> bool:
    # The loader already made local model paths absolute (config/paths.py: relative to the job
    # file), so anything still relative is a hub id, "name" or "org/name".
    return os.path.isabs(value)


def _resolve(cfg, key_path: str, model_id: str, revision: str | None, download: bool):
    # Imported here: the hub package costs ~50 ms, and a local model dir never needs it.
    from hpcinfer.hub.errors import HubError
    from hpcinfer.hub.offline import resolve_model
    try:
        if not download:
            return resolve_model(model_id, revision)
        from hpcinfer.hub.cli import exit_at_once_on_interrupt
        from hpcinfer.hub.download import resolve_or_download
        with exit_at_once_on_interrupt(f"interrupted: run `hpcinfer download {model_id}` "
                                       "to resume (finished files are kept), then render again"):
            return resolve_or_download(model_id, revision)
    except HubError as exc:
        fix = "" if download else "or render with --download to fetch it now"
        raise cfg.error_at(key_path, str(exc), fix) from None
