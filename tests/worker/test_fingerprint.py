"""A job dir belongs to one config (compile/fingerprint.py): a changed config rendered or run
into a dir with committed work is refused with the diff and the ways out; --restart archives
the old outputs and runs the new config; the worker refuses a hand-edited job.yaml there."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_results,
                                          run_worker, write_jsonl)

pytestmark = pytest.mark.timeout(240)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], capture_output=True,
                          text=True, timeout=180, env=env)


def test_changed_config_is_refused_with_the_diff_and_restart_archives(tmp_path, model_dir):
    write_jsonl(tmp_path / "data" / "p.jsonl", prompt_rows(5))
    config = job_config(model_dir, "data/p.jsonl")
    job_dir = make_job(tmp_path, config)
    job = str(tmp_path / "job.yaml")
    first = json.loads((job_dir / "fingerprint.json").read_text())
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    assert json.loads((job_dir / "shards/00000/DONE").read_text())["fingerprint"] == \
        first["fingerprint"]
    metrics = [json.loads(ln) for p in (job_dir / "metrics").glob("*.jsonl")
               for ln in p.read_text().splitlines()]
    assert {m.get("fingerprint") for m in metrics} == {first["fingerprint"]}
    old_texts = [r["text"] for r in read_results(job_dir)[0]]

    # What changes no output (commit interval, engine sizes, bad-row budget) renders as is.
    for setting in ("output.commit_every_rows=2", "engine.max_num_seqs=2",
                    "input.max_bad_rows=3"):
        proc = _cli("render", job, "--set", setting)
        assert proc.returncode == 0, (setting, proc.stderr)

    # A new temperature and a touched input file: refused, naming both and the ways out.
    os.utime(tmp_path / "data" / "p.jsonl", (1, 1))
    refused = _cli("run", job, "--local", "--set", "sampling.temperature=0.7")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    err = refused.stderr
    assert "holds committed results of another config" in err
    assert "sampling.temperature: 0.0 -> 0.7" in err
    assert f"input.file {tmp_path / 'data' / 'p.jsonl'}: size" in err and "1970-01-01" in err
    assert "--out DIR" in err and "--restart" in err
    assert json.loads((job_dir / "fingerprint.json").read_text()) == first   # nothing written

    # The worker refuses a job.yaml edited by hand in the same dir, before the model loads.
    resolved = yaml.safe_load((job_dir / "job.yaml").read_text())
    resolved["sampling"]["max_tokens"] = 3
    (job_dir / "job.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rc, out = run_worker(job_dir)
    assert rc == 2 and "sampling.max_tokens: 6 -> 3" in out and "engine ready" not in out, out

    # --restart: the old outputs go to archive/<time>/, the new config runs from scratch.
    restarted = _cli("run", job, "--local", "--restart", "--set", "sampling.max_tokens=3")
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr
    assert "--restart: moved the old outputs to" in restarted.stderr
    [archive] = (job_dir / "archive").iterdir()
    assert json.loads((archive / "fingerprint.json").read_text()) == first
    assert (archive / "shards/00000/DONE").is_file() and (archive / "metrics").is_dir()
    new = [r["text"] for r in read_results(job_dir)[0]]
    assert len(new) == 5 and new != old_texts        # answered again with max_tokens 3
    second = json.loads((job_dir / "fingerprint.json").read_text())
    assert second["values"]["sampling.max_tokens"] == 3
    assert json.loads((job_dir / "shards/00000/DONE").read_text())["fingerprint"] == \
        second["fingerprint"]
    # The local backend exports resources.mem (2G) as sbatch would: the KV pool is sized
    # from it (or from a tighter cgroup limit), never from the machine's free memory.
    [engine] = [json.loads(ln) for p in (job_dir / "metrics").glob("*.jsonl")
                for ln in p.read_text().splitlines() if '"event": "engine"' in ln]
    assert 0 < engine["cpu_memory"]["limit_bytes"] <= 2 * 2**30, engine
