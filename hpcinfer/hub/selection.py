"""Which files of a model repo to download: one copy of the weights plus what loading needs.

Weights: safetensors when the repo has them, and then no .bin/.pt/.pth/.msgpack/.h5/onnx/gguf
duplicates. With a `model.safetensors.index.json` exactly the shards it names are taken (repos
such as Mistral also carry a `consolidated.safetensors` that would double the download).
Alongside: config, generation config, tokenizer files, chat templates, custom code, and the
sentence-transformers modules (`modules.json`, `1_Pooling/...`, `2_Dense/...`).
User --include patterns add files, --exclude patterns remove them (applied last).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_OTHER_FORMATS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data",
                  ".gguf", ".ot", ".tflite", ".mlmodel", ".safetensors")
_OTHER_FORMAT_INDEXES = re.compile(r".*\.(bin|pt|msgpack|h5)\.index\.json$|^tf_model.*\.json$")
# Top-level small files that loading a model, its tokenizer or its chat template reads.
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "tokenizer*",
               "vocab*", "merges*")
# sentence-transformers module folders: "1_Pooling", "2_Dense", "3_Normalize", ...
_ST_MODULE_DIR = re.compile(r"^\d+_[A-Za-z]\w*$")


def is_weight_file(path: str) -> bool:
    return path.endswith(_OTHER_FORMATS)


def choose_files(repo_files: Iterable[str], weight_map: dict[str, str] | None = None,
                 include: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """Sorted repo paths to download.

    repo_files: every file path in the repo at the pinned commit.
    weight_map: the "weight_map" of model.safetensors.index.json when the repo has one (shard
    names are its values); None before the index has been fetched.
    """
    files = sorted(set(repo_files))
    chosen = set(_top_level_side_files(files)) | set(_weights(files, weight_map))
    chosen |= set(_sentence_transformers_files(files))
    chosen |= {f for f in files if _matches(f, include)}
    return sorted(f for f in chosen if not _matches(f, exclude))


def small_files_first(repo_files: Iterable[str]) -> list[str]:
    """The files needed before weights can be chosen (today: the safetensors index)."""
    return [f for f in repo_files if f == SAFETENSORS_INDEX]


def _top_level_side_files(files: list[str]) -> list[str]:
    top = [f for f in files if "/" not in f and not is_weight_file(f)]
    return [f for f in top if _matches(f, _SIDE_FILES) and not _OTHER_FORMAT_INDEXES.match(f)]


def _weights(files: list[str], weight_map: dict[str, str] | None) -> list[str]:
    top = [f for f in files if "/" not in f]
    if SAFETENSORS_INDEX in top:
        # Shards the index names but the repo lacks are still listed: the download then skips
        # them and verification reports the missing file by name.
        shards = set(weight_map.values()) if weight_map else set()
        return [SAFETENSORS_INDEX, *sorted(shards)]
    if SAFETENSORS_SINGLE in top:
        return [SAFETENSORS_SINGLE]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    if safetensors:
        return safetensors
    # No safetensors at all: fall back to the pickled PyTorch weights (and their index).
    return [f for f in top if (f.startswith("pytorch_model") and f.endswith(".bin"))
            or f == _PICKLE_INDEX]


def _sentence_transformers_files(files: list[str]) -> list[str]:
    if "modules.json" not in files:
        return []
    by_dir: dict[str, list[str]] = {}
    for f in files:
        head, _, rest = f.partition("/")
        if rest and "/" not in rest and _ST_MODULE_DIR.match(head):
            by_dir.setdefault(head, []).append(f)
    chosen = []
    for members in by_dir.values():
        side = [f for f in members if not is_weight_file(f)]
        weights = _weights([f.split("/", 1)[1] for f in members], None)
        chosen += side + [f"{members[0].split('/', 1)[0]}/{w}" for w in weights]
    return chosen


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)
