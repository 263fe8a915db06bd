"""The download record: what `hpcinfer download` fetched, where `render` and workers find it.

Layout (inside the hub cache, so a shared Lustre cache shares its records too):

    <hub cache>/hpcinfer/models/models--org--name/<quoted revision>.json

One file per (model id, requested revision), each a complete, self-contained JSON object:
    {"id", "revision", "commit", "path" (absolute snapshot dir), "files" {relpath: bytes},
     "size" (bytes), "downloaded_at" (ISO-8601 UTC), "patterns" {"include", "exclude"}}
Writers never read-modify-write: each write goes to a unique temp file in the same folder and
is renamed over the target (atomic on POSIX, Lustre and GPFS within one directory), so two
users or jobs downloading at once both leave a valid record and readers never see half a file.
No token or other secret is ever part of a record.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from hpcinfer.hub.paths import records_dir, repo_folder_name

log = logging.getLogger(__name__)

_SUFFIX = ".json"


@dataclass(frozen=True)
class ModelRecord:
    id: str
    revision: str
    commit: str
    path: str
    files: dict[str, int]
    size: int
    downloaded_at: str
    patterns: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelRecord:
        return cls(id=data["id"], revision=data["revision"], commit=data["commit"],
                   path=data["path"], files={k: int(v) for k, v in data["files"].items()},
                   size=int(data["size"]), downloaded_at=data["downloaded_at"],
                   patterns=data.get("patterns") or {})


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def record_path(model_id: str, revision: str, cache_dir=None) -> Path:
    return records_dir(cache_dir) / repo_folder_name(model_id) / (quote(revision, safe="") + _SUFFIX)


def write_record(record: ModelRecord, cache_dir=None) -> Path:
    """Atomically write (or replace) the record for (record.id, record.revision)."""
    target = record_path(record.id, record.revision, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by the group
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_records(model_id: str | None = None, cache_dir=None) -> list[ModelRecord]:
    """All readable records (of one model, or of every model), newest download first."""
    root = records_dir(cache_dir)
    folders = [root / repo_folder_name(model_id)] if model_id else _subdirs(root)
    records = [r for folder in folders for r in _read_folder(folder)]
    return sorted(records, key=lambda r: r.downloaded_at, reverse=True)


def find_record(model_id: str, revision: str | None = None, cache_dir=None) -> ModelRecord | None:
    """The record matching `revision`: the same name, or a commit (full or a >=7-char prefix).

    revision None -> the download of "main" (the hub's default, as transformers reads None),
    else the newest download of the model, whatever revision it pinned.
    """
    records = read_records(model_id, cache_dir)
    if revision is None:
        default = [r for r in records if r.revision == "main"]
        return (default or records or [None])[0]
    for record in records:
        if record.revision == revision:
            return record
    if len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision.lower()):
        for record in records:
            if record.commit.startswith(revision.lower()):
                return record
    return None


def _subdirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def _read_folder(folder: Path) -> list[ModelRecord]:
    try:
        names = sorted(p for p in folder.iterdir() if p.suffix == _SUFFIX and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    records = []
    for path in names:
        try:
            records.append(ModelRecord.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A foreign or damaged file must not hide the other records; say which one.
            log.warning("ignoring unreadable download record %s: %s", path, exc)
    return records
