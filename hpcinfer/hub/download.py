"""`hpcinfer download`: pin a revision to a commit, fetch one copy of the weights, verify, record.

Login node only (needs the network). huggingface_hub is imported inside the functions so that
`hpcinfer --help` stays fast. It owns the cache layout, resumption and the per-file locks that
make two concurrent downloads into one (Lustre) cache safe: each process writes a unique temp
file and renames it into `blobs/`, so the loser of a race only wastes bandwidth.
The token comes from HF_TOKEN or the stored `hf auth login`; this module never reads, logs or
writes it (huggingface_hub picks it up itself).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from hpcinfer.hub.errors import (DownloadError, ModelNotDownloaded, ModelPathNotFound,
                                 VerificationError)
from hpcinfer.hub.hub_errors import translate_hub_errors
from hpcinfer.hub.offline import ResolvedModel, is_offline, resolve_model
from hpcinfer.hub.paths import hub_cache_dir, repo_folder_name
from hpcinfer.hub.record import ModelRecord, utc_now, write_record
from hpcinfer.hub.selection import SAFETENSORS_INDEX, choose_files
from hpcinfer.hub.verify import verify_snapshot

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
STALE_PARTIAL_S = 3600.0


def download_model(model_id: str, revision: str | None = None, include: Iterable[str] = (),
                   exclude: Iterable[str] = (), cache_dir: str | os.PathLike | None = None,
                   max_workers: int = 8) -> ModelRecord:
    """Download `model_id` at `revision` (default "main") into the hub cache; return its record.

    Safe to re-run: files already in the cache are not fetched again, so an interrupted
    download resumes. Raises HubError subclasses (ModelAccessError, DownloadError,
    VerificationError) with messages that say what to do.
    """
    _refuse_offline_mode()
    include, exclude = list(include), list(exclude)
    requested = revision or "main"
    cache = hub_cache_dir(cache_dir)
    remove_stale_partials(cache / repo_folder_name(model_id) / "blobs")
    with translate_hub_errors(model_id, requested):
        commit, sizes = _pin_revision(model_id, requested)
        log.info("%s: revision %s is commit %s", model_id, requested, commit)
        weight_map = _fetch_weight_map(model_id, commit, cache) if SAFETENSORS_INDEX in sizes else None
        chosen = choose_files(sizes, weight_map, include, exclude)
        _refuse_incomplete_upload(model_id, commit, cache, [f for f in chosen if f not in sizes])
        files = [f for f in chosen if f in sizes]
        if not files:
            raise DownloadError(f"no file of {model_id} at {requested} matches the selection "
                                f"(include={include}, exclude={exclude}): loosen --include/--exclude")
        _drop_damaged_files(cache / repo_folder_name(model_id) / "snapshots" / commit, files, sizes)
        snapshot = _snapshot_download(model_id, commit, files, cache, max_workers)
    _write_ref(cache, model_id, requested, commit)
    expected = {f: sizes[f] for f in files if sizes[f] is not None}
    # With --include/--exclude the user may have asked for config or tokenizer files only.
    verify_snapshot(snapshot, expected, require_weights=not (include or exclude))
    record = ModelRecord(id=model_id, revision=requested, commit=commit,
                         path=os.path.abspath(snapshot), files=expected,
                         size=sum(expected.values()), downloaded_at=utc_now(),
                         patterns={"include": include, "exclude": exclude})
    where = write_record(record, cache)
    log.info("%s: %d files, %d bytes at %s (record %s)", model_id, len(files), record.size,
             record.path, where)
    return record


def resolve_or_download(model_id: str, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None) -> ResolvedModel:
    """For `render --download`: the recorded snapshot, downloading it first when missing."""
    try:
        return resolve_model(model_id, revision, cache_dir)
    except ModelPathNotFound:
        raise  # a path, not a hub id: nothing to download
    except ModelNotDownloaded:
        log.info("%s is not downloaded yet: downloading it now", model_id)
    download_model(model_id, revision, cache_dir=cache_dir)
    return resolve_model(model_id, revision or "main", cache_dir)


def _refuse_incomplete_upload(model_id: str, commit: str, cache: Path, absent: list[str]) -> None:
    # Shards named by the index but absent from the repo: no download can fix that, so stop
    # before fetching gigabytes of the other shards.
    if absent:
        path = cache / repo_folder_name(model_id) / "snapshots" / commit / absent[0]
        raise VerificationError(str(path), f"is missing on the hub (named in {SAFETENSORS_INDEX} "
                                f"of commit {commit})",
                                "the upload is incomplete: choose another --revision or tell "
                                f"the model's owner at https://huggingface.co/{model_id}")


def _refuse_offline_mode() -> None:
    if is_offline():
        raise DownloadError("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set in this environment, so "
                            "nothing can be downloaded: run `hpcinfer download` on the login node "
                            "with those variables unset")


def _endpoint() -> str | None:
    # Read at call time: huggingface_hub freezes HF_ENDPOINT at its import.
    return os.environ.get("HF_ENDPOINT") or None


def _pin_revision(model_id: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """(commit sha, {repo path: size in bytes}) of `revision`, from one model_info call."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=_endpoint()).model_info(model_id, revision=revision, files_metadata=True)
    if not info.sha:
        raise DownloadError(f"the hub returned no commit for {model_id} at {revision}: try again")
    return info.sha, {s.rfilename: s.size for s in (info.siblings or [])}


def _fetch_weight_map(model_id: str, commit: str, cache: Path) -> dict[str, str]:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(model_id, SAFETENSORS_INDEX, revision=commit, cache_dir=cache,
                           endpoint=_endpoint())
    try:
        weight_map = json.loads(Path(path).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DownloadError(f"{path}: {model_id}'s {SAFETENSORS_INDEX} has no readable "
                            f"weight_map ({exc})") from exc
    return dict(weight_map)


def _snapshot_download(model_id: str, commit: str, files: list[str], cache: Path,
                       max_workers: int) -> str:
    from huggingface_hub import snapshot_download

    log.info("%s: fetching %d files into %s", model_id, len(files), cache)
    # Exact names, escaped: allow_patterns are fnmatch patterns and a '[' in a name would match
    # something else.
    return snapshot_download(model_id, revision=commit, cache_dir=cache, endpoint=_endpoint(),
                             allow_patterns=[glob.escape(f) for f in files],
                             max_workers=max_workers)


def remove_stale_partials(blobs: Path, max_idle_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Delete `*.incomplete` temp files nobody has written to for `max_idle_s`.

    Each huggingface_hub download writes its own uniquely named temp file, so one left by a
    killed process is never resumed or reused; on a shared quota it is just lost space. A live
    download writes every few seconds (or times out), so an hour of silence means it is dead.
    """
    removed = []
    now = time.time()
    for partial in blobs.glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > max_idle_s:
                partial.unlink()
                removed.append(partial)
        except OSError:
            continue  # another user's file we may not delete, or already gone
    if removed:
        log.info("removed %d abandoned partial downloads from %s", len(removed), blobs)
    return removed


def _drop_damaged_files(snapshot: Path, files: list[str], sizes: dict[str, int | None]) -> None:
    """Remove cached files whose size is wrong, so huggingface_hub fetches them again.

    huggingface_hub trusts any file already in a snapshot; a blob truncated by a full quota or
    overwritten by hand would otherwise stay broken forever. Sizes come from the hub's listing.
    """
    for name in files:
        pointer = snapshot / name
        expected = sizes.get(name)
        if not os.path.lexists(pointer) or expected is None:
            continue
        if os.path.exists(pointer) and os.path.getsize(pointer) == expected:
            continue
        log.warning("%s is damaged (size differs from the hub's %d bytes): fetching it again",
                    pointer, expected)
        blob = os.path.realpath(pointer)
        pointer.unlink()
        if blob != str(pointer) and os.path.exists(blob):
            os.unlink(blob)


def _write_ref(cache: Path, model_id: str, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, as huggingface_hub writes it, for tools that load by id.

    We download by commit (so a branch moving mid-download cannot mix two commits), which means
    huggingface_hub itself does not record which branch or tag that commit came from.
    """
    if _COMMIT.match(revision):
        return
    ref = cache / repo_folder_name(model_id) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=ref.parent)
        with os.fdopen(fd, "w") as f:
            f.write(commit)
        os.chmod(tmp, 0o644)
        os.replace(tmp, ref)
    except OSError as exc:
        # Only a convenience for other tools; our own record is what render and workers use.
        log.warning("could not write %s: %s", ref, exc)
