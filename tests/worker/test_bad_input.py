"""Bad-input corpus through the real worker: 24 bad rows of 14 kinds in a generate job,
9 bad OpenAI batch requests, and 3 kinds of bad file (JSONL cut short, Parquet overwritten
with garbage, Parquet without the prompt column), mixed into good data. Good rows are all
answered, each bad row is in errors.jsonl with its kind, nothing is lost or duplicated, and
a bad file fails only its own shard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcinfer.testing.io_corpus import (BAD_OPENAI_LINES, BAD_PROMPT_LINES, good_row,
                                        openai_line, write_mixed_jsonl)
from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          run_worker, write_parquet)

pytestmark = pytest.mark.timeout(240)

# The worker refuses inputs with duplicate ids before it starts (test_worker_local), so the
# corpus's duplicate_id line is left out here.
BAD_ROWS = [(k, line) for k, line in BAD_PROMPT_LINES if k != "duplicate_id"]
LONG_LINE = ("prompt_too_long",
             json.dumps({"id": "long", "prompt": "cluster batch " * 60}).encode())


def _parquet_rows(num_rows: int, prefix: str) -> list[dict]:
    return [{**good_row(i), "id": f"{prefix}{i}"} for i in range(num_rows)]


def _shard_of(job_dir: Path, name: str) -> int:
    plan = json.loads((job_dir / "plan.json").read_text())
    [index] = [s["index"] for s in plan["shards"] if Path(s["file"]).name == name]
    return index


def test_bad_rows_and_bad_files_through_the_worker(tmp_path, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    kinds = write_mixed_jsonl(data / "a-mixed.jsonl", 20, BAD_ROWS + [LONG_LINE], every=3)
    write_parquet(data / "b-good.parquet", _parquet_rows(9, "p"))
    write_mixed_jsonl(data / "c-cut.jsonl", 6, [])
    write_parquet(data / "d-garbage.parquet", _parquet_rows(5, "g"))
    write_parquet(data / "e-nocolumn.parquet", _parquet_rows(5, "n"))
    config = job_config(model_dir, [str(data / "*.jsonl"), str(data / "*.parquet")],
                        model={"id": str(model_dir), "max_model_len": 64},
                        # a corpus of bad rows: no bad-row budget (test_bad_row_budget.py)
                        input={"sampling_field": "sampling", "passthrough": ["topic"],
                               "max_bad_rows": 1.0})
    job_dir = make_job(tmp_path, config)
    # Broken after the job was planned (what a user editing inputs mid-job does).
    (data / "c-cut.jsonl").write_bytes(b"".join((data / "c-cut.jsonl").open("rb").readlines()[:3]))
    (data / "d-garbage.parquet").write_bytes(b"PAR1 this is not parquet at all" * 10)
    write_parquet(data / "e-nocolumn.parquet", [{"id": f"n{i}"} for i in range(5)])

    exits = {}
    for task in range(5):
        exits[task], out = run_worker(job_dir, SLURM_ARRAY_TASK_ID=str(task))
        assert exits[task] in (0, 2), out
    shard = {name: _shard_of(job_dir, name) for name in
             ("a-mixed.jsonl", "b-good.parquet", "c-cut.jsonl", "d-garbage.parquet",
              "e-nocolumn.parquet")}
    assert exits[shard["a-mixed.jsonl"]] == exits[shard["b-good.parquet"]] == 0
    failed = {"c-cut.jsonl": "ends at line 3 but the plan expects rows up to 6",
              "d-garbage.parquet": "not a readable Parquet file",
              "e-nocolumn.parquet": "has no column 'prompt'"}
    for name, reason in failed.items():
        assert exits[shard[name]] == 2
        marker = job_dir / "shards" / f"{shard[name]:05d}" / "FAILED"
        assert reason in json.loads(marker.read_text())["reason"], name

    results = read_results(job_dir)
    mixed = results[shard["a-mixed.jsonl"]]
    good_indices = sorted(set(range(20 + len(kinds))) - set(kinds))
    assert [r["row_index"] for r in mixed] == good_indices
    assert [r["id"] for r in mixed] == [f"r{i}" for i in range(20)]
    # Per-row sampling overrides (max_tokens 8 + i % 5) were applied.
    assert all(r["num_output_tokens"] <= 8 + i % 5 for i, r in enumerate(mixed))
    assert any(r["num_output_tokens"] > 6 for r in mixed)
    assert [r["id"] for r in results[shard["b-good.parquet"]]] == [f"p{i}" for i in range(9)]
    errors = [e for e in read_errors(job_dir) if e["file"].endswith("a-mixed.jsonl")]
    assert {e["row_index"]: e["kind"] for e in errors} == kinds
    assert len(errors) == len(BAD_ROWS) + 1 == 24 and len(set(kinds.values())) == 14
    assert all(e["reason"] for e in errors)
    # The failed shards committed nothing and wrote no DONE; status says why.
    from hpcinfer.slurm.status import format_status, gather
    info = gather(job_dir)
    states = {p["shard"]: p["state"] for t in info["tasks"] for p in t["shard_progress"]}
    assert [states[shard[n]] for n in failed] == ["failed"] * 3
    assert "not a readable Parquet file" in format_status(info)


def test_bad_openai_requests(tmp_path, model_dir):
    good = [openai_line(f"chat-{i}") for i in range(4)] + \
        [openai_line(f"cmpl-{i}", url="/v1/completions", prompt=f"say {i}", max_tokens=3)
         for i in range(3)]
    lines, kinds = [], {}
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(BAD_OPENAI_LINES):
            kinds[len(lines)] = BAD_OPENAI_LINES[i][0]
            lines.append(BAD_OPENAI_LINES[i][1])
    for kind, line in BAD_OPENAI_LINES[len(good):]:
        kinds[len(lines)] = kind
        lines.append(line)
    path = tmp_path / "data" / "batch.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = job_config(model_dir, str(path), input={"format": "openai-batch", "max_bad_rows": 1.0},
                        output={"format": "openai-batch"})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    assert [r["custom_id"] for r in records] == [f"chat-{i}" for i in range(4)] + \
        [f"cmpl-{i}" for i in range(3)]
    bodies = [r["response"]["body"] for r in records]
    assert [b["object"] for b in bodies] == ["chat.completion"] * 4 + ["text_completion"] * 3
    assert all(b["usage"]["completion_tokens"] <= 3 for b in bodies[4:])
    assert {e["row_index"]: e["kind"] for e in read_errors(job_dir)} == kinds
    assert len(kinds) == 9
