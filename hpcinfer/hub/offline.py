"""Compute-node side: never touch the network, resolve a model to an absolute snapshot path.

Call `set_offline_env(os.environ)` before transformers or huggingface_hub are imported (both read
the variables once, at import), then `resolve_model(model.id, model.revision, cache_dir)`.
Pure stdlib: importing this module imports no hub client and opens no socket.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.hub.errors import ModelNotDownloaded, ModelPathNotFound
from hpcinfer.hub.record import find_record

log = logging.getLogger(__name__)

OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                # No telemetry pings from nodes that cannot reach the hub anyway.
                "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class ResolvedModel:
    id: str                 # what the user asked for (hub id, or the path as given)
    revision: str | None    # requested revision recorded at download (None for a local dir)
    commit: str | None      # pinned commit sha (None for a local dir outside an HF cache)
    path: str               # absolute snapshot directory to load from

    @property
    def bind_path(self) -> str:
        """What a container must bind for `path` to work inside it.

        A hub-cache snapshot holds symlinks into `../../blobs/`, so binding the snapshot alone
        leaves dangling links: bind its `models--org--name` folder instead.
        """
        snapshot = Path(self.path)
        if snapshot.parent.name == "snapshots" and (snapshot.parent.parent / "blobs").is_dir():
            return str(snapshot.parent.parent)
        return self.path


def set_offline_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Put huggingface_hub/transformers/datasets into offline mode; cache variables are kept.

    HF_HOME / HF_HUB_CACHE are left exactly as configured (the job's env sets them to the shared
    cache). If huggingface_hub was already imported, its frozen constant is switched too.
    """
    env = os.environ if environ is None else environ
    env.update(OFFLINE_VARS)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and env is os.environ:
        # huggingface_hub read HF_HUB_OFFLINE at import; without this it would still go online.
        constants.HF_HUB_OFFLINE = True
        log.debug("huggingface_hub was imported before set_offline_env; switched it offline")


def resolve_model(model_id_or_path: str, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> ResolvedModel:
    """A local directory -> itself; a hub id -> its recorded snapshot. Never uses the network.

    Raises ModelNotDownloaded ("run `hpcinfer download ID` on the login node first") when there
    is no record for (id, revision) or its snapshot is no longer on disk.
    """
    local = Path(os.path.expanduser(model_id_or_path))
    if local.is_dir():
        path = os.path.abspath(local)
        return ResolvedModel(id=model_id_or_path, revision=revision, commit=_commit_of(path), path=path)
    if _looks_like_path(model_id_or_path):
        raise ModelPathNotFound(model_id_or_path)
    record = find_record(model_id_or_path, revision, cache_dir)
    if record is None:
        raise ModelNotDownloaded(model_id_or_path, revision)
    missing = [f for f in sorted(record.files) if not os.path.exists(os.path.join(record.path, f))]
    if missing:
        raise ModelNotDownloaded(model_id_or_path, revision,
                                 f"{os.path.join(record.path, missing[0])} is gone from the cache")
    return ResolvedModel(id=record.id, revision=record.revision, commit=record.commit, path=record.path)


def _looks_like_path(value: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash or a leading ./ ~ is a path.
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or value.endswith("/")


def _commit_of(path: str) -> str | None:
    # .../models--org--name/snapshots/<sha>: a directory inside an HF cache knows its commit.
    parent = Path(path).parent
    name = Path(path).name
    if parent.name == "snapshots" and len(name) == 40 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def model_dir(model: str, revision: str | None = None) -> str:
    """The directory ``LLM(model=...)`` loads, as vLLM finds it: a local directory as given; a
    GGUF file as the checkpoint converted from it (once, in a cache: hpcinfer.models.gguf);
    a hub id from the snapshot ``hpcinfer download`` recorded, else from the Hugging Face
    cache (a snapshot vLLM, transformers or ``huggingface-cli`` fetched before), else
    downloaded now (and recorded) unless the environment is offline (HF_HUB_OFFLINE, as on
    compute nodes): then ModelNotDownloaded says to run ``hpcinfer download`` on the login
    node. The hub client is imported only for the last two."""
    local = Path(os.path.expanduser(model))
    if local.is_dir():
        return str(local)
    if local.suffix == ".gguf" and local.is_file():   # converted once (hpcinfer.models.gguf)
        from hpcinfer.models.gguf import gguf_checkpoint
        return str(gguf_checkpoint(local))
    try:
        return resolve_model(model, revision).path
    except ModelPathNotFound:
        raise
    except ModelNotDownloaded as missing:
        not_recorded = missing
    cached = _hf_cache_snapshot(model, revision)
    if cached is not None:
        return cached
    if is_offline():
        raise not_recorded
    from hpcinfer.hub.download import download_model
    log.info("%s is not in the cache: downloading it now", model)
    return download_model(model, revision).path


def _hf_cache_snapshot(model: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(model, "config.json", revision=revision)
    return os.path.dirname(config) if isinstance(config, str) else None


def is_offline() -> bool:
    """Whether this environment forbids the hub (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or a
    huggingface_hub already imported offline)."""
    if any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and constants.HF_HUB_OFFLINE)
