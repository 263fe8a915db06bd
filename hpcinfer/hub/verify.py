"""Checks that a snapshot on disk is complete and loadable, without torch or safetensors.

- every file the download record lists is present (a dangling cache symlink counts as missing)
  and has the size the hub reported;
- every shard named in `model.safetensors.index.json` is present;
- every `*.safetensors` file has a readable header whose tensors exactly fill the file
  (a truncated or overwritten shard fails here, naming the file);
- `config.json`, when present, is valid JSON.
Each failure raises VerificationError with the offending file's path.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hpcinfer.hub.errors import VerificationError
from hpcinfer.hub.selection import SAFETENSORS_INDEX, is_weight_file

# safetensors itself refuses headers over 100 MB; a larger length means the file is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedSnapshot:
    path: str
    num_files: int
    size: int  # bytes of every regular file under path


def verify_snapshot(path: str | os.PathLike, expected_files: dict[str, int] | None = None,
                    require_weights: bool = True) -> VerifiedSnapshot:
    """Raise VerificationError naming the first bad file; return a summary when all is well."""
    root = Path(path)
    if not root.is_dir():
        raise VerificationError(str(root), "is not a directory")
    for rel, size in sorted((expected_files or {}).items()):
        _check_size(root / rel, size)
    _check_index(root)
    files = _regular_files(root)
    for rel in files:
        if rel.endswith(".safetensors"):
            check_safetensors_header(root / rel)
    if (root / "config.json").exists():
        _load_json(root / "config.json")
    if require_weights and not any(is_weight_file(rel) for rel in files):
        raise VerificationError(str(root), "contains no weight files (*.safetensors or *.bin)")
    return VerifiedSnapshot(str(root), len(files), sum(os.path.getsize(root / f) for f in files))


def check_safetensors_header(file: Path) -> None:
    """The 8-byte little-endian header length, the JSON header, and offsets that fill the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise VerificationError(str(file), f"is {size} bytes, too short for safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise VerificationError(str(file), f"has an invalid safetensors header length "
                                                   f"{header_len} for a {size}-byte file")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise VerificationError(str(file), f"cannot be read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(str(file), "has a safetensors header that is not valid JSON") from exc
    data_bytes = _data_end(file, header)
    if 8 + header_len + data_bytes != size:
        raise VerificationError(str(file), f"is {size} bytes but its header describes "
                                           f"{8 + header_len + data_bytes} (truncated download?)")


def _data_end(file: Path, header: object) -> int:
    if not isinstance(header, dict):
        raise VerificationError(str(file), "has a safetensors header that is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise VerificationError(str(file), f"tensor {name!r} has no data_offsets") from exc
        if not 0 <= begin <= stop:
            raise VerificationError(str(file), f"tensor {name!r} has bad data_offsets")
        end = max(end, stop)
    return end


def _check_size(file: Path, expected: int) -> None:
    if not file.exists():
        raise VerificationError(str(file), "is missing")
    actual = file.stat().st_size
    if actual != expected:
        raise VerificationError(str(file), f"is {actual} bytes, the hub says {expected}")


def _check_index(root: Path) -> None:
    index = root / SAFETENSORS_INDEX
    if not index.exists():
        return
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise VerificationError(str(index), "has no weight_map")
    for shard in sorted(set(weight_map.values())):
        if not (root / shard).exists():
            raise VerificationError(str(root / shard), f"is missing (named in {SAFETENSORS_INDEX})")


def _load_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VerificationError(str(file), f"cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise VerificationError(str(file), f"is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise VerificationError(str(file), "is not a JSON object")
    return data


def _regular_files(root: Path) -> list[str]:
    # Walk the snapshot (symlinks into blobs/ are followed by exists/stat), skipping dot-folders
    # such as a local_dir's .cache/.
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not full.exists():
                raise VerificationError(str(full), "is missing (dangling link into the cache)")
            found.append(rel)
    return sorted(found)
