"""LoRA adapters from the hub: the same cache, pinning and records as models (download.py).

An adapter repo is small: ``adapter_config.json`` and ``adapter_model.safetensors`` are all
the engine reads, so nothing else is fetched (no README, no training state, no copy of a
base model that a mislabelled repo may hold). After the download the adapter is checked
like a local one (hpcinfer.lora.adapter_config: PEFT options, LoRA keys, rank, torch-free).

Offline, ``resolve_adapter`` finds the recorded snapshot, as ``resolve_model`` does for
models; ``hpcinfer validate`` / ``render`` pin a job's hub adapters with it
(config/lora_checks.py). Login side: no torch; huggingface_hub only inside a download.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from hpcinfer.hub.errors import DownloadError, ModelNotDownloaded, VerificationError
from hpcinfer.hub.paths import hub_cache_dir, repo_folder_name
from hpcinfer.hub.record import ModelRecord, find_record, utc_now, write_record

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class AdapterNotDownloaded(ModelNotDownloaded):
    """A hub adapter named in a job with no download record."""

    def __init__(self, adapter_id: str, job_file: str | None = None) -> None:
        self.model_id, self.revision = adapter_id, None
        how = (f"`hpcinfer download --job {job_file}`" if job_file
               else f"`hpcinfer download --adapter {adapter_id}`")
        Exception.__init__(self, f"LoRA adapter {adapter_id} is not a local directory (relative "
                                 "paths are relative to the job file) nor a downloaded hub "
                                 f"adapter: run {how} on the login node first, or fix the path")


def looks_like_hub_id(value: str) -> bool:
    """After config/paths.py made local adapter paths absolute, the rest are hub ids."""
    return not os.path.isabs(value)


def download_adapter(adapter_id: str, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> ModelRecord:
    """Fetch a PEFT LoRA adapter's two files at ``revision`` (default main), pinned to its
    commit, check them and record the download; re-running resumes. HubError subclasses
    (DownloadError, VerificationError, ModelAccessError) say what to do."""
    from hpcinfer.hub import download as dl
    dl._refuse_offline_mode()
    requested = revision or "main"
    cache = hub_cache_dir(cache_dir)
    dl.remove_stale_partials(cache / repo_folder_name(adapter_id) / "blobs")
    with dl.translate_hub_errors(adapter_id, requested):
        commit, sizes = dl._pin_revision(adapter_id, requested)
        _refuse_non_adapter(adapter_id, requested, sizes)
        files = list(ADAPTER_FILES)
        snapshot_dir = cache / repo_folder_name(adapter_id) / "snapshots" / commit
        dl._drop_damaged_files(snapshot_dir, files, sizes)
        snapshot = dl._snapshot_download(adapter_id, commit, files, cache, max_workers=2)
    dl._write_ref(cache, adapter_id, requested, commit)
    expected = {f: sizes[f] for f in files if sizes[f] is not None}
    dl.verify_snapshot(snapshot, expected, require_weights=False)
    check_adapter_files(snapshot, adapter_id)
    record = ModelRecord(id=adapter_id, revision=requested, commit=commit,
                         path=os.path.abspath(snapshot), files=expected,
                         size=sum(expected.values()), downloaded_at=utc_now(),
                         patterns={"include": files, "exclude": [], "kind": "lora_adapter"})
    write_record(record, cache)
    log.info("%s: LoRA adapter at %s", adapter_id, record.path)
    return record


def _refuse_non_adapter(adapter_id: str, revision: str, sizes: dict) -> None:
    if CONFIG_FILE not in sizes:
        raise DownloadError(f"{adapter_id} at {revision} is not a PEFT LoRA adapter: it has no "
                            f"{CONFIG_FILE} (a base model? download models with `hpcinfer "
                            f"download {adapter_id}` and list only adapters under lora.adapters)")
    if WEIGHTS_FILE not in sizes:
        bin_only = " (only adapter_model.bin: load it with peft and save_pretrained it again, " \
                   "which writes safetensors, then use that directory)" \
            if "adapter_model.bin" in sizes else ""
        raise DownloadError(f"{adapter_id} at {revision} has no {WEIGHTS_FILE}{bin_only}")


def check_adapter_files(path: str | os.PathLike, adapter_id: str) -> None:
    """The downloaded files form an adapter hpcinfer can serve (torch-free)."""
    from hpcinfer.lora.adapter_config import AdapterError, read_adapter_config
    try:
        read_adapter_config(path, adapter_id)
    except AdapterError as exc:
        raise VerificationError(str(path), str(exc), "use another adapter or revision") from None


def resolve_adapter(adapter_id: str, cache_dir: str | os.PathLike | None = None,
                    job_file: str | None = None) -> str:
    """The recorded snapshot directory of a downloaded hub adapter; never uses the network.
    AdapterNotDownloaded when there is no record, or its files are gone."""
    record = find_record(adapter_id, None, cache_dir)
    if record is None or not all((Path(record.path) / f).exists() for f in ADAPTER_FILES):
        raise AdapterNotDownloaded(adapter_id, job_file)
    return record.path


def resolve_or_download_adapter(adapter_id: str, cache_dir=None, job_file: str | None = None
                                ) -> str:
    """For ``render --download``: the recorded snapshot, downloading the adapter when missing."""
    try:
        return resolve_adapter(adapter_id, cache_dir, job_file)
    except AdapterNotDownloaded:
        log.info("LoRA adapter %s is not downloaded yet: downloading it now", adapter_id)
    return download_adapter(adapter_id, cache_dir=cache_dir).path
