"""Worker test helpers: a tiny model, a rendered job dir, the real worker as a subprocess.

Used by tests/worker and dev/quickstart.sh. ``make_job`` writes a job YAML next to its data
and renders it (compile + write the job dir, no Slurm); ``run_worker`` starts
``python -m hpcinfer.worker JOBDIR`` the way the batch script does.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

FAMILY = "llama"


@functools.lru_cache(maxsize=None)
def tiny_model_dir(root: str) -> Path:
    """A tiny llama checkpoint under root (built once per process and root)."""
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    path = Path(root) / "tiny-llama"
    if not (path / "config.json").exists():
        build_tiny_checkpoint(FAMILY, path)
    return path


def prompt_rows(num_rows: int, start: int = 0, prefix: str = "q") -> list[dict]:
    words = ["cluster", "batch", "prompts", "Slurm", "GPU", "tokens", "answer", "world"]
    return [{"id": f"{prefix}{i}", "prompt": f"Hello {words[i % 8]} {i}: what is {words[i * 3 % 8]}?",
             "topic": f"t{i % 3}"} for i in range(start, start + num_rows)]


def chat_rows(num_rows: int, prefix: str = "c") -> list[dict]:
    return [{"id": f"{prefix}{i}", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"hello {i}, how are the GPUs?"}]} for i in range(num_rows)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    return path


def job_config(model_dir: Path, input_path: Any, **sections: Any) -> dict:
    config: dict[str, Any] = {
        "name": "w", "cluster": "generic", "task": "generate", "model": {"id": str(model_dir)},
        "input": {"path": input_path, "id_field": "id", "prompt_field": "prompt",
                  "shard_rows": 1000},
        "output": {"dir": "out", "commit_every_rows": 4, "commit_every_s": 30},
        "sampling": {"temperature": 0.0, "max_tokens": 6},
        "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 256},
        "resources": {"device": "cpu", "time": "00:05:00", "cpus_per_task": 1, "mem": "2G"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def make_job(root: Path, config: dict, render: bool = True) -> Path:
    """Write root/job.yaml; with render, write the job dir too. Returns the job dir."""
    root.mkdir(parents=True, exist_ok=True)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(config, sort_keys=False))
    job_dir = root / config["output"]["dir"]
    if render:
        from hpcinfer.compile.jobdir import compile_job, write_job_dir
        from hpcinfer.config import load_job
        write_job_dir(compile_job(load_job(job)))
    return job_dir


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k != "HPCINFER_WORKER_PHASES"}
    env.update(HPCINFER_BACKEND="local", HPCINFER_PROGRESS_EVERY_S="1", **extra)
    return env


def start_worker(job_dir: Path, log_path: Path | None = None, **env: str) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.PIPE
    try:
        return subprocess.Popen([sys.executable, "-m", "hpcinfer.worker", str(job_dir)],
                                env=worker_env(**env), stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log_path:
            out.close()


def run_worker(job_dir: Path, timeout_s: float = 120, **env: str) -> tuple[int, str]:
    proc = start_worker(job_dir, **env)
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out.decode("utf-8", "replace")


def read_results(job_dir: Path) -> dict[int, list[dict]]:
    """{shard index: records sorted by row_index} from the committed parts."""
    from hpcinfer.io.formats import format_of_part, make_format
    from hpcinfer.io.ledger import committed_parts
    results = {}
    for shard in sorted((job_dir / "shards").iterdir()):
        records = [r for p in committed_parts(shard)
                   for r in make_format(format_of_part(p)).read(p)]
        results[int(shard.name)] = sorted(records, key=lambda r: r["row_index"])
    return results


def read_errors(job_dir: Path) -> list[dict]:
    errors = []
    for path in sorted((job_dir / "shards").glob("*/errors.jsonl")):
        errors += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return errors


# Engine sizes of the pooling job tests: the job's `engine:` block and the Python API they are
# compared with must be the same.
POOLING_ENGINE = {"max_num_seqs": 2, "max_num_batched_tokens": 256}


def pooling_llm(model: Path, task: str, **kwargs):
    """The Python API with the pooling job tests' engine sizes."""
    from hpcinfer import LLM
    return LLM(str(model), task=task, device="cpu", **POOLING_ENGINE, **kwargs)


def finished_output(request_id: str, prompt_token_ids: list[int], text: str,
                    token_ids: list[int]):
    """The engine's RequestOutput of a request answered in full (finish_reason "length"), for
    worker-loop tests that stand in for the engine."""
    from hpcinfer.engine.outputs import CompletionOutput, RequestOutput
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_token_ids,
                         outputs=[CompletionOutput(0, text, token_ids, None, None, "length")],
                         finished=True)
