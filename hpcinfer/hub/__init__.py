"""Models from the Hugging Face Hub: download on the login node, resolve offline on compute nodes.

Login side:   download_model(id, revision, include, exclude, cache_dir) -> ModelRecord
              resolve_or_download(id, revision, cache_dir) -> ResolvedModel   (render --download)
              hpcinfer.hub.cli.add_hub_commands(subparsers)                   (download, models,
                                                                               verify-model)
Compute side: set_offline_env(os.environ) before importing transformers, then
              resolve_model(id_or_path, revision, cache_dir) -> ResolvedModel (never networked)
Every module here imports huggingface_hub lazily, inside the functions that need the network.
"""
from __future__ import annotations

from hpcinfer.hub.download import download_model, resolve_or_download
from hpcinfer.hub.errors import (
    DownloadError,
    HubError,
    ModelAccessError,
    ModelNotDownloaded,
    ModelPathNotFound,
    VerificationError,
)
from hpcinfer.hub.offline import ResolvedModel, resolve_model, set_offline_env
from hpcinfer.hub.record import ModelRecord, find_record, read_records
from hpcinfer.hub.verify import verify_snapshot

__all__ = [
    "DownloadError", "HubError", "ModelAccessError", "ModelNotDownloaded", "ModelPathNotFound",
    "ModelRecord", "ResolvedModel", "VerificationError", "download_model", "find_record",
    "read_records", "resolve_model", "resolve_or_download", "set_offline_env", "verify_snapshot",
]
