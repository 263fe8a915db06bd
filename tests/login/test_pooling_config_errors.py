"""`hpcinfer validate` refuses what the worker cannot run for pooling tasks, at the job
file's line, with the fix: OpenAI batch input/output for a task without an OpenAI url
(classify, reward), OpenAI batch output without OpenAI batch input and the reverse, and
`pooling:` keys that are out of range or do not apply to the task. The worker refuses the
same formats before loading a model (setup.check_supported)."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest

from hpcinfer.cli import main
from hpcinfer.testing.jobs import tree, write_job

BASE = """\
name: t
cluster: generic
task: {task}
model: {{id: ./model}}
input:
  path: "data/*.jsonl"
  format: {input_format}
  id_field: id
  text_field: prompt
output:
  dir: out
  format: {output_format}
resources: {{device: cpu, time: "00:05:00", cpus_per_task: 1, mem: 1G}}
"""
INPUT_FORMAT_LINE, OUTPUT_FORMAT_LINE = 7, 12


def _job(task="embed", input_format="jsonl", output_format="jsonl", extra="") -> str:
    return BASE.format(task=task, input_format=input_format,
                       output_format=output_format) + extra


# (id, job text, line the error points at, fragments of the one-line message)
CASES = [
    ("classify-openai-input", _job("classify", "openai-batch", "openai-batch"),
     INPUT_FORMAT_LINE, ["task classify has no OpenAI batch url", "/v1/embeddings",
                         "use jsonl or parquet for input.format"]),
    ("reward-openai-output", _job("reward", output_format="openai-batch"),
     OUTPUT_FORMAT_LINE, ["task reward has no OpenAI batch url", "output.format"]),
    ("embed-openai-output-from-jsonl", _job("embed", output_format="openai-batch"),
     OUTPUT_FORMAT_LINE, ["output.format: openai-batch answers OpenAI batch requests",
                          "task embed reads jsonl rows", "format: jsonl",
                          "input.format: openai-batch"]),
    ("score-openai-input-jsonl-output", _job("score", "openai-batch", "jsonl"),
     OUTPUT_FORMAT_LINE, ["answered with OpenAI batch lines", "format: openai-batch"]),
    ("dimensions-zero", _job(extra="pooling:\n  dimensions: 0\n"), 15,
     ["pooling.dimensions"]),
    ("unknown-pooling-type", _job(extra="pooling:\n  pooling_type: max\n"), 15,
     ["pooling.pooling_type", "MEAN"]),
    ("dimensions-for-classify", _job("classify", extra="pooling: {dimensions: 8}\n"), 14,
     ["pooling.dimensions: applies to task embed only", "task is classify",
      "remove dimensions"]),
    ("activation-for-embed", _job(extra="pooling:\n  normalize: true\n  use_activation: no\n"),
     16, ["pooling.use_activation: applies to task classify and score only"]),
    ("pooling-for-generate", BASE.format(task="generate", input_format="jsonl",
                                         output_format="jsonl").replace(
        "text_field", "prompt_field") + "pooling: {normalize: false}\n", 14,
     ["pooling.normalize: applies to task embed only", "task is generate"]),
    ("unknown-pooling-key", _job(extra="pooling:\n  dimension: 8\n"), 15,
     ["did you mean 'dimensions'"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_validate_refuses_with_line_and_fix(case, tmp_path, capsys):
    case_id, text, line, fragments = case
    job = write_job(tmp_path, text=text)
    before = tree(tmp_path)
    rc = main(["validate", str(job)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case_id, err)
    assert len(err.splitlines()) == 1, err
    assert re.search(re.escape(f"{job}:{line}:"), err), (case_id, err)
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (case_id, fragment, err)
    assert tree(tmp_path) == before


def _openai_rows(root: Path) -> None:
    for path in (root / "data").glob("*.jsonl"):
        path.write_text("".join(json.dumps(
            {"custom_id": f"{path.stem}-{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"input": f"text {i}"}}) + "\n" for i in range(3)))


def test_valid_pooling_jobs_pass(tmp_path, capsys):
    job = write_job(tmp_path / "a", text=_job("embed", extra=(
        "pooling: {pooling_type: mean, dimensions: 8, normalize: true}\n")))
    assert main(["validate", str(job)]) == 0, capsys.readouterr().err
    job = write_job(tmp_path / "b", text=_job("embed", "openai-batch", "openai-batch"))
    _openai_rows(tmp_path / "b")
    assert main(["validate", str(job)]) == 0, capsys.readouterr().err
    job = write_job(tmp_path / "c", text=_job("classify", extra="pooling: {use_activation: no}\n"))
    assert main(["validate", str(job)]) == 0, capsys.readouterr().err


def test_worker_backstop_refuses_the_same_formats():
    from hpcinfer.worker.setup import TaskFailed, check_supported

    def cfg(task, input_format, output_format):
        return types.SimpleNamespace(task=task, input=types.SimpleNamespace(format=input_format),
                                     output=types.SimpleNamespace(format=output_format),
                                     sampling=types.SimpleNamespace(n=1))
    check_supported(cfg("embed", "openai-batch", "openai-batch"))
    check_supported(cfg("score", "parquet", "jsonl"))
    for task, fin, fout in [("classify", "openai-batch", "openai-batch"),
                            ("embed", "jsonl", "openai-batch"),
                            ("score", "openai-batch", "parquet")]:
        with pytest.raises(TaskFailed, match="output.format|input.format"):
            check_supported(cfg(task, fin, fout))
