"""The real worker started directly (no Slurm): answers equal the Python API's, model and
input problems exit 2 with one clear line, long prompts, status and collect."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hpcinfer.config.errors import ConfigError
from hpcinfer.testing.worker_jobs import (chat_rows, job_config, make_job, prompt_rows,
                                          read_errors, read_results, run_worker, write_jsonl,
                                          write_parquet)

pytestmark = pytest.mark.timeout(180)


def _sampling(max_tokens=6):
    from hpcinfer import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcinfer.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_chat_job_equals_llm_chat_and_collect_status(tmp_path, model_dir, llm):
    rows = chat_rows(7)
    write_jsonl(tmp_path / "data" / "chat.jsonl", rows)
    config = job_config(model_dir, "data/chat.jsonl", task="chat",
                        input={"prompt_field": None, "messages_field": "messages"},
                        output={"commit_every_rows": 3})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    assert "progress: rows 7/7" in out and "all shards of this task are DONE" in out
    [records] = read_results(job_dir).values()
    expected = llm.chat([r["messages"] for r in rows], _sampling(), use_tqdm=False)
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert [r["text"] for r in records] == [o.outputs[0].text for o in expected]
    assert [r["num_prompt_tokens"] for r in records] == [len(o.prompt_token_ids) for o in expected]
    assert len(list((job_dir / "shards" / "00000").glob("part-*.jsonl"))) >= 2   # every 3 rows

    proc = _cli("collect", str(job_dir), "--format", "parquet")
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq
    table = pq.read_table(job_dir / "outputs" / "00000.parquet").to_pylist()
    assert [r["text"] for r in table] == [r["text"] for r in records]
    proc = _cli("status", str(job_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    [task] = info["tasks"]
    assert info["rows_done"] == 7 and task["shard_progress"][0]["state"] == "done"
    assert task["throughput"]["rows_per_s"] > 0 and task["throughput"]["out_tok_per_s"] > 0
    text = _cli("status", str(job_dir)).stdout
    assert "7/7" in text and "done" in text and "tok/s" in text


def test_missing_model_is_one_line_exit_2_within_5s(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(3))
    gone = tmp_path / "gone-model"
    gone.mkdir()
    (gone / "config.json").write_text("{}")
    job_dir = make_job(tmp_path, job_config(gone, "data/a.jsonl"))
    (gone / "config.json").unlink()
    gone.rmdir()                       # deleted after rendering: the worker finds nothing there
    started = time.monotonic()
    rc, out = run_worker(job_dir, HF_HOME=str(tmp_path / "hf"))
    elapsed_s = time.monotonic() - started
    assert rc == 2, out
    assert elapsed_s < 5, elapsed_s
    errors = [ln for ln in out.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "is not a directory" in errors[0]
    assert "hpcinfer download" in errors[0], errors[0]
    assert "torch" not in out


def test_hub_id_not_downloaded_exit_2(tmp_path):
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(2))
    (tmp_path / "m").mkdir()
    job_dir = make_job(tmp_path, job_config(tmp_path / "m", "data/a.jsonl"))
    # Point job.yaml at a hub id nobody downloaded (what a login-side render would pin).
    job_yaml = job_dir / "job.yaml"
    job_yaml.write_text(job_yaml.read_text().replace(str(tmp_path / "m"), "acme/never-downloaded"))
    rc, out = run_worker(job_dir, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf"))
    assert rc == 2, out
    [line] = [ln for ln in out.splitlines() if " ERROR " in ln]
    assert "acme/never-downloaded" in line and "hpcinfer download" in line


def test_duplicate_ids_refused_by_worker_and_validate(tmp_path, model_dir):
    rows = prompt_rows(5)
    rows[3]["id"] = rows[1]["id"]
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    job_dir = make_job(tmp_path, job_config(model_dir, "data/a.jsonl"))
    rc, out = run_worker(job_dir)
    assert rc == 2, out
    assert "duplicate id values ('q1' at a.jsonl row 1, a.jsonl row 3)" in out
    assert not list(job_dir.glob("shards/*/part-*"))
    proc = _cli("validate", str(tmp_path / "job.yaml"))
    assert proc.returncode == 2 and "duplicate id values" in proc.stderr
    assert "('q1' at a.jsonl row 1, a.jsonl row 3)" in proc.stderr


def test_pooling_openai_input_needs_openai_output(tmp_path, model_dir):
    # OpenAI-batch /v1/embeddings input runs (tests/worker/test_pooling_openai_batch.py), but a
    # request may hold several inputs, so its answer needs OpenAI-batch output lines: the job is
    # refused at render time, with the fix, before anything reaches the worker.
    write_jsonl(tmp_path / "data" / "a.jsonl", [
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "m", "input": "embed me"}}])
    config = job_config(model_dir, "data/a.jsonl", task="embed",
                        input={"format": "openai-batch", "id_field": None, "prompt_field": None})
    with pytest.raises(ConfigError, match="write `format: openai-batch` under output"):
        make_job(tmp_path, config)


def test_long_prompts_error_or_truncate(tmp_path, model_dir):
    long_prompt = " ".join(["cluster batch"] * 40)           # > 48 tokens
    rows = [{"id": "short", "prompt": "Hello world"}, {"id": "long", "prompt": long_prompt}]
    write_jsonl(tmp_path / "data" / "a.jsonl", rows)
    config = job_config(model_dir, str(tmp_path / "data" / "a.jsonl"),
                        model={"id": str(model_dir), "max_model_len": 48})
    job_dir = make_job(tmp_path / "error", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["id"] for r in records] == ["short"]
    [bad] = read_errors(job_dir)
    assert bad["kind"] == "prompt_too_long" and bad["id"] == "long" and "48" in bad["reason"]

    config["resilience"] = {"on_long_prompt": "truncate"}
    job_dir = make_job(tmp_path / "truncate", config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["id"] for r in records] == ["short", "long"] and not read_errors(job_dir)
    # The tail that fits, with room for one generated token.
    assert records[1]["num_prompt_tokens"] == 47
    assert (records[1]["num_output_tokens"], records[1]["finish_reason"]) == (1, "length")


def test_stop_flag_writes_rows_the_async_engine_finished_but_had_not_reported(
        tmp_path, model_dir):
    """Async scheduling reports a step's finished rows on the next step() call: a stop flag
    set between the two must still commit them (LLMEngine.drain), not redo them."""
    from hpcinfer.compile.plan import Shard
    from hpcinfer.engine.config import EngineConfig
    from hpcinfer.engine.llm_engine import LLMEngine
    from hpcinfer.io import ledger
    from hpcinfer.io.formats import make_format
    from hpcinfer.io.rows import InputSpec
    from hpcinfer.worker.loop import LoopOptions, ShardLoop
    from hpcinfer.worker.progress import Progress
    from hpcinfer.worker.requests import RequestBuilder
    from hpcinfer.worker.signals import StopFlag

    stop = StopFlag()

    class StopAfterTwoSteps(LLMEngine):
        num_steps = 0

        def step(self, final_only=False):
            outputs = super().step(final_only)
            self.num_steps += 1
            if self.num_steps == 2:   # call 1: prefill; call 2: the last token is sampled
                stop.signal_name = "SIGUSR2"
            return outputs

    engine = StopAfterTwoSteps(EngineConfig(model=str(model_dir), device="cpu",
                                            max_num_seqs=4, max_num_batched_tokens=256))
    assert engine._async                          # else this test shows nothing
    shard = Shard(index=0, file=str(write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))),
                  start=0, stop=3)
    builder = RequestBuilder(engine.tokenizer, {"temperature": 0.0, "max_tokens": 2},
                             engine.max_model_len)
    loop = ShardLoop(engine, shard, InputSpec(), tmp_path / "shard", make_format("jsonl"),
                     builder, stop, Progress(3, 0, None, use_bar=False), LoopOptions())
    assert loop.run() == "stopped"
    assert engine.num_steps == 2
    assert sorted(ledger.recover(tmp_path / "shard").done_indices) == [0, 1, 2]
    assert not engine.get_num_unfinished_requests()


def test_only_a_replicas_driver_probes_input_and_output(tmp_path, model_dir, monkeypatch):
    """Preflight of a TP=2 job whose input vanished: rank 0 (a driver) fails on it, rank 1
    (a follower: it never reads input nor writes output) passes."""
    from hpcinfer.worker import preflight
    data = write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(2))
    job_dir = make_job(tmp_path, job_config(model_dir, str(data), parallel={"tensor": 2}))
    data.unlink()
    for name in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK",
                 "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    record = preflight.new_record()
    preflight.check(job_dir, record)
    assert record["rank"] == 1 and not list(job_dir.glob(".preflight-*"))
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(preflight.PreflightFailed, match="a.jsonl is not readable here"):
        preflight.check(job_dir, preflight.new_record())


@pytest.mark.parametrize("engine, expected", [
    ({}, (True, None)),
    ({"async_scheduling": False}, (False, None)),
    ({"pipeline_micro_batches": 3}, (True, 3)),
])
def test_job_engine_options_reach_engine_config(tmp_path, model_dir, engine, expected):
    from types import SimpleNamespace

    from hpcinfer.config import load_job
    from hpcinfer.worker import setup
    config = job_config(model_dir, "data/a.jsonl", engine=engine)
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(1))
    make_job(tmp_path, config, render=False)
    cfg = load_job(tmp_path / "job.yaml")
    made = setup.engine_config(cfg, SimpleNamespace(path=str(model_dir)))
    assert (made.async_scheduling, made.pipeline_micro_batches) == expected


def test_pipeline_micro_batches_below_one_is_a_config_error(tmp_path, model_dir):
    from hpcinfer.config import load_job
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(1))
    make_job(tmp_path, job_config(model_dir, "data/a.jsonl",
                                  engine={"pipeline_micro_batches": 0}), render=False)
    with pytest.raises(ConfigError, match="engine.pipeline_micro_batches"):
        load_job(tmp_path / "job.yaml")
