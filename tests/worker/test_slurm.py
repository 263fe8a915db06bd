"""The real worker on the real single-host Slurm (tests/conftest.py starts it): a 4-shard
array (2 JSONL, 2 Parquet) and an OpenAI batch job equal the Python API row for row, and the
warning signal (scancel --batch --signal=USR2, and a time limit with --signal=B:USR2@50)
makes the job commit, requeue itself and finish with every row exactly once."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpcinfer.testing.io_corpus import openai_line
from hpcinfer.testing.slurm_jobs import job_logs, submit, wait_finished, wait_log
from hpcinfer.testing.worker_jobs import (job_config, prompt_rows, read_results, write_jsonl,
                                          write_parquet)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240)]


def _sampling(max_tokens=6):
    from hpcinfer import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def test_array_of_jsonl_and_parquet_and_openai_batch_equal_the_python_api(
        slurm_cluster, tmp_path, model_dir, llm):
    data = tmp_path / "data"
    files = {"a.jsonl": prompt_rows(5, 0), "b.jsonl": prompt_rows(3, 5),
             "c.parquet": prompt_rows(6, 8), "d.parquet": prompt_rows(4, 14)}
    for name, rows in files.items():
        (write_jsonl if name.endswith(".jsonl") else write_parquet)(data / name, rows)
    resources = {"partition": slurm_cluster}
    gen_dir, _ = submit(tmp_path / "gen", job_config(
        model_dir, [str(data / "*.jsonl"), str(data / "*.parquet")], resources=resources,
        input={"passthrough": ["topic"]}))
    requests = [openai_line(f"chat-{i}", messages=[{"role": "user", "content": f"hi {i}"}])
                for i in range(3)] + \
        [openai_line(f"cmpl-{i}", url="/v1/completions", prompt=f"say {i}", max_tokens=4)
         for i in range(3)]
    (data / "batch").mkdir()
    (data / "batch" / "requests.jsonl").write_bytes(b"\n".join(requests) + b"\n")
    oai_dir, _ = submit(tmp_path / "oai", job_config(
        model_dir, str(data / "batch" / "requests.jsonl"), resources=resources,
        input={"format": "openai-batch"}, output={"dir": "out", "format": "openai-batch"}))

    info = wait_finished(gen_dir)
    assert info["summary"] == {"COMPLETED": 4} and info["rows_done"] == 18
    results = read_results(gen_dir)
    plan = json.loads((gen_dir / "plan.json").read_text())
    for shard in plan["shards"]:
        rows = files[Path(shard["file"]).name]
        expected = llm.generate([r["prompt"] for r in rows], _sampling(), use_tqdm=False)
        got = results[shard["index"]]
        assert [(r["id"], r["topic"]) for r in got] == [(r["id"], r["topic"]) for r in rows]
        assert [r["text"] for r in got] == [o.outputs[0].text for o in expected]
        assert [r["num_output_tokens"] for r in got] == [len(o.outputs[0].token_ids)
                                                         for o in expected]

    info = wait_finished(oai_dir)
    assert info["summary"] == {"COMPLETED": 1}
    [got] = read_results(oai_dir).values()
    chats = llm.chat([[{"role": "user", "content": f"hi {i}"}] for i in range(3)], _sampling(),
                     use_tqdm=False)
    completions = llm.generate([f"say {i}" for i in range(3)], _sampling(4), use_tqdm=False)
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in got[:3]] == \
        [o.outputs[0].text for o in chats]
    assert [r["response"]["body"]["choices"][0]["text"] for r in got[3:]] == \
        [o.outputs[0].text for o in completions]
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "collect", str(oai_dir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (oai_dir / "outputs" / "00000.openai.jsonl").read_text().splitlines()
    assert [json.loads(ln)["custom_id"] for ln in lines] == [r["custom_id"] for r in got]


def _slow_job(tmp_path: Path, model_dir: Path, partition: str, num_rows: int,
              step_delay_s: float, **sections) -> dict:
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(num_rows))
    # The first run is slowed (test hook) so the signal lands while rows are in flight.
    env = {"HPCINFER_WORKER_STEP_DELAY_S": str(step_delay_s),
           "HPCINFER_WORKER_STEP_DELAY_RUNS": "1", "HPCINFER_PROGRESS_EVERY_S": "1"}
    return job_config(model_dir, str(tmp_path / "data" / "a.jsonl"), env=env,
                      resources={"partition": partition}, output={"commit_every_rows": 4},
                      **sections)


def _assert_requeued_once_and_exactly_once(job_dir: Path, job_id: str, llm, num_rows: int,
                                           signalled_after_a_commit: bool):
    info = wait_finished(job_dir)
    assert info["summary"] == {"COMPLETED": 1}, info
    text = job_logs(job_dir)
    assert "received SIGUSR2: committed what finished" in text
    assert f"requeueing {job_id} (restart 1 of" in text
    assert "(restart 0, at most" in text and "(restart 1, at most" in text
    assert "all shards of this task are DONE" in text
    [records] = read_results(job_dir).values()
    assert [r["row_index"] for r in records] == list(range(num_rows))
    expected = llm.generate([r["prompt"] for r in prompt_rows(num_rows)], _sampling(),
                            use_tqdm=False)
    assert [r["text"] for r in records] == [o.outputs[0].text for o in expected]
    finishes = [json.loads(ln) for ln in
                (job_dir / "metrics" / "task-00000-rank-000.jsonl").read_text().splitlines()
                if '"finish"' in ln]
    assert [f["status"] for f in finishes][0] == "requeue" and finishes[-1]["status"] == "ok"
    # What the first run reported committing is what the second run found committed.
    found = [int(n) for n in re.findall(r"(\d+) of \d+ rows already committed", text)]
    assert len(found) == 2 and finishes[0]["rows_done"] == found[1], (found, finishes[0])
    if signalled_after_a_commit:
        assert finishes[0]["rows_done"] > 0      # the first run committed before requeueing
    return info


def test_scancel_usr2_commits_requeues_and_finishes(slurm_cluster, tmp_path, model_dir, llm):
    config = _slow_job(tmp_path, model_dir, slurm_cluster, 24, 0.3)
    job_dir, job_id = submit(tmp_path, config)
    wait_log(job_dir, "progress: rows 4/", timeout_s=60)            # committed rows are in flight now
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    _assert_requeued_once_and_exactly_once(job_dir, job_id, llm, 24, True)


def test_time_limit_warning_signal_requeues(slurm_cluster, tmp_path, model_dir, llm):
    # --time=1 with --signal=B:USR2@50: Slurm signals up to its 30 s check interval early,
    # so the first (slowed) run is long enough to always be running when it comes. It may
    # come before the engine has answered a row (seen: 2 s after the start, during the model
    # load), so this test cannot ask the first run to have committed rows, only that what
    # it committed is what the second run finds (the scancel test asks for rows).
    config = _slow_job(tmp_path, model_dir, slurm_cluster, 60, 0.5,
                       resilience={"signal_seconds": 50})
    config["resources"]["time"] = "00:01:00"
    job_dir, job_id = submit(tmp_path, config)
    assert "#SBATCH --signal=B:USR2@50" in (job_dir / "submit.sbatch").read_text()
    _assert_requeued_once_and_exactly_once(job_dir, job_id, llm, 60, False)
