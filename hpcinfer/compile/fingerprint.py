"""A job dir belongs to one config: the fingerprint of everything that changes its outputs.

Why: re-running a changed config into a job dir with committed work used to return the old
outputs ("every shard ... DONE already") under the new job.yaml. Render writes
``JOBDIR/fingerprint.json``; rendering, running or submitting a config whose fingerprint
differs into a dir that holds committed work is refused with the differing keys (old -> new)
and the two ways out: a new output dir, or ``--restart``, which moves the old outputs to
``JOBDIR/archive/<UTC time>/``. The worker checks job.yaml against the file too, and records
the fingerprint in its metrics lines and in each shard's DONE.

What counts (values as job.yaml resolves them): the model (id = the pinned snapshot path,
revision, dtype, max_model_len, tokenizer), the task, the input's columns, template, format
and shard size, every input file's size and mtime, the output's format and columns, all
sampling and pooling keys, the device (dtype auto differs between CPU and GPU),
resilience.on_long_prompt, the engine keys that change the numbers (quantization,
kv_cache_dtype, load_format) and the LoRA adapters (name -> path or hub id), the last two
kinds only when set (so job dirs rendered before they counted, with the defaults, still
resume). Not counted: what only changes speed or bookkeeping (the other engine.* keys,
lora.max_loras / max_lora_rank, parallel.*, resources other than the device, commit
intervals, input.max_bad_rows).

Login side: no torch, only os.stat of the input files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_FILE = "fingerprint.json"
ARCHIVE_DIR = "archive"
FILE_KEY = "input.file "          # prefix of a per-file key: "input.file /abs/path"
# Section -> keys left out of the fingerprint (None: the whole section counts).
_COUNTED = {"model": None, "input": None, "output": None, "sampling": None, "pooling": None}
_NOT_COUNTED = {"input": {"path", "max_bad_rows"}, "output": {"dir", "commit_every_rows",
                                                                "commit_every_s"}}
# Engine keys that change outputs, with the default that leaves them out of the fingerprint.
_OUTPUT_ENGINE_KEYS = {"quantization": None, "kv_cache_dtype": "auto", "load_format": "auto"}
# What render moves to the archive on --restart (the job's outputs and their records).
_ARCHIVED = ("shards", "outputs", "metrics", "logs", "submissions.jsonl", FINGERPRINT_FILE,
             "job.yaml", "plan.json")


@dataclass(frozen=True)
class Fingerprint:
    values: dict           # flat {"sampling.temperature": 0.7, "input.file /x.jsonl": "..."}

    @property
    def digest(self) -> str:
        text = json.dumps(self.values, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def config_values(self) -> dict:
        """The values without the input files' stats (what job.yaml alone determines)."""
        return {k: v for k, v in self.values.items() if not k.startswith(FILE_KEY)}

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.digest, "values": self.values}, indent=1,
                          sort_keys=True, default=str) + "\n"


def compute(cfg, input_files, with_files: bool = True) -> Fingerprint:
    """The fingerprint of a resolved config and its input files (plan.input_files)."""
    data = cfg.model_dump(mode="json")
    values = {"task": data.get("task"), "resources.device": data["resources"].get("device"),
              "resilience.on_long_prompt": data["resilience"].get("on_long_prompt")}
    for section in _COUNTED:
        skip = _NOT_COUNTED.get(section, set())
        for key, value in (data.get(section) or {}).items():
            if key not in skip:
                values[f"{section}.{key}"] = value
    engine = data.get("engine") or {}
    for key, default in _OUTPUT_ENGINE_KEYS.items():
        if engine.get(key, default) != default:
            values[f"engine.{key}"] = engine[key]
    adapters = (data.get("lora") or {}).get("adapters")
    if adapters:
        values["lora.adapters"] = adapters
    if with_files:
        for path in sorted(input_files):
            values[FILE_KEY + str(path)] = _file_stat(path)
    return Fingerprint(values)


def _file_stat(path) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "(missing)"
    mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(st.st_mtime))
    return f"size {st.st_size}, mtime {mtime}.{int(st.st_mtime_ns % 10**9):09d}Z"


def load(job_dir) -> Fingerprint | None:
    """The fingerprint render stored in a job dir (None: none, e.g. an older job dir)."""
    path = Path(job_dir) / FINGERPRINT_FILE
    try:
        return Fingerprint(json.loads(path.read_text())["values"])
    except (OSError, ValueError, KeyError):
        return None


def has_committed_work(job_dir) -> bool:
    """Whether any shard dir holds a committed part, bad row or DONE (io/ledger.py layout)."""
    for shard in Path(job_dir, "shards").glob("[0-9]" * 5):
        for entry in shard.iterdir():
            if entry.name.startswith("part-") or entry.name == "DONE" or (
                    entry.name == "errors.jsonl" and entry.stat().st_size > 0):
                return True
    return False


def diff(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key that differs (absent on one side: '(none)')."""
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "(none)"), new.get(key, "(none)")
        if a != b:
            lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def changed_message(job_dir, lines: list[str]) -> str:
    shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20
                                      else "")
    return (f"{job_dir} holds committed results of another config (fingerprint.json); what "
            f"changed:\n  {shown}\nits outputs would mix the two")


RESTART_HINT = ("write to a new output dir (--out DIR or output.dir), or pass --restart to move "
                "the old outputs to {job_dir}/archive/<time>/ and start over")


def archive_outputs(job_dir) -> Path | None:
    """--restart: move the old outputs and their records to JOBDIR/archive/<UTC time>/;
    returns that dir (None when there was nothing to move). Renames only: same filesystem."""
    job_dir = Path(job_dir)
    present = [name for name in _ARCHIVED if (job_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = job_dir / ARCHIVE_DIR / stamp
    n = 1
    while dest.exists():          # two restarts within a second
        n += 1
        dest = job_dir / ARCHIVE_DIR / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in present:
        shutil.move(str(job_dir / name), str(dest / name))
    return dest
