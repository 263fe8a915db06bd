"""Small job files with their data, written into a test's tmp dir (login-side tests)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_rows(path: Path, num_rows: int, start: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + num_rows):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"question {i}"}) + "\n")
    return path


def write_job(root: Path, name: str = "t", rows: tuple[int, ...] = (5, 5), text: str | None = None,
              **sections) -> Path:
    """A valid CPU job (model dir, JSONL inputs under root/data) plus `sections` merged on top
    (a value None deletes the key). With `text`, that YAML is written verbatim instead."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text("{}")
    for i, n in enumerate(rows):
        write_rows(root / "data" / f"part-{i}.jsonl", n, start=100 * i)
    job = root / "job.yaml"
    if text is not None:
        job.write_text(text)
        return job
    config = {
        "name": name, "cluster": "generic", "task": "generate", "model": {"id": "./model"},
        "input": {"path": "data/*.jsonl", "id_field": "id", "prompt_field": "prompt", "shard_rows": 5},
        "output": {"dir": "out"},
        "resources": {"device": "cpu", "time": "00:05:00", "cpus_per_task": 1, "mem": "1G"},
    }
    for key, value in sections.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    job.write_text(yaml.safe_dump(config, sort_keys=False))
    return job


def tree(root: Path) -> set[str]:
    """Every path under root (relative), to assert that a command wrote nothing."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# The smallest job file the config loader accepts (config tests add keys on top of it).
MINIMAL_JOB = """\
name: t1
model: {id: org/model}
input: {path: "data/*.jsonl"}
"""


def write_job_text(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    """Write a job file from (dedented) YAML text; returns its path."""
    import textwrap
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path
