"""Bad-input corpus through `hpcinfer validate` and `hpcinfer render`: each case gives one
clear line on stderr (file:line where one exists), exit code 2, and writes nothing."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hpcinfer.cli import main
from hpcinfer.testing.jobs import tree, write_job

GOOD = """\
name: t
cluster: generic
model: {id: ./model}
input: {path: "data/*.jsonl", id_field: id, prompt_field: prompt, shard_rows: 5}
output: {dir: out}
resources: {device: cpu, time: "00:05:00", cpus_per_task: 1, mem: 1G}
"""


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def _parquet_without_id(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": [1, 2], "prompt": ["a", "b"]}), root / "data" / "x.parquet")


def _dangling_symlink(root: Path) -> None:
    os.symlink(root / "data" / "gone.jsonl", root / "data" / "part-9.jsonl")


def _output_under_a_file(root: Path) -> None:
    (root / "blocker").write_text("a file, not a directory")


def _tight_profile(root: Path) -> None:
    (root / "site.yaml").write_text("slurm: {max_array_size: 1}\n")


def _empty_inputs(root: Path) -> None:
    for f in (root / "data").glob("*.jsonl"):
        f.write_text("")


# (id, job text, --set overrides, setup(root), expected message fragment, has file:line)
CASES = [
    ("yaml-syntax", GOOD + "env: {A: [unclosed\n", (), None, "", True),
    ("wrong-type", _replace("cpus_per_task: 1", "cpus_per_task: many"), (), None, "cpus_per_task", True),
    ("unknown-key", GOOD + "resorces: {time: '01:00:00'}\n", (), None, "resources", True),
    ("unknown-cluster", _replace("cluster: generic", "cluster: nosuch"), (), None, "nosuch", True),
    ("bad-time", _replace('time: "00:05:00"', "time: 4h"), (), None, "resources.time", True),
    ("zero-gpus", _replace("device: cpu", "device: cuda, gpus_per_node: 0"), (), None, "device: cpu", True),
    ("negative-gpus", _replace("device: cpu", "device: cuda, gpus_per_node: -2"), (), None, "gpus_per_node", True),
    ("tp-pp-vs-gpus", _replace("device: cpu", "device: cuda, gpus_per_node: 2") + "parallel: {tensor: 4}\n",
     (), None, "tensor", True),
    ("glob-matches-nothing", _replace("data/*.jsonl", "nothere/*.jsonl"), (), None, "matches no file", True),
    ("unreadable-input", GOOD, (), _dangling_symlink, "not readable", True),
    ("parquet-without-id", _replace("data/*.jsonl", "data/*.parquet"), (), _parquet_without_id,
     "no column 'id'", True),
    ("unwritable-output", _replace("dir: out", "dir: blocker/out"), (), _output_under_a_file, "output.dir", True),
    ("missing-image", GOOD + "container: {image: ./nothere.sif}\n", (), None, "container.image", True),
    ("array-too-large", _replace("cluster: generic", "cluster: ./site.yaml"), (), _tight_profile,
     "MaxArraySize", True),
    ("account-required", _replace("cluster: generic", "cluster: alliance-canada"), (), None, "account", True),
    ("bad-name", _replace("name: t", "name: 'my job'"), (), None, "name", True),
    ("missing-model", GOOD.replace("model: {id: ./model}\n", ""), (), None, "model", False),
    ("set-unknown-key", GOOD, ("resources.tmie=01:00:00",), None, "tmie", False),
    ("set-bad-value", GOOD, ("parallel.tensor=abc",), None, "parallel.tensor", False),
    ("bad-env-name", GOOD + "env: {'1BAD': x}\n", (), None, "1BAD", True),
    ("extra-sbatch-owned-flag", _replace("mem: 1G", "mem: 1G, extra_sbatch: {time: '02:00:00'}"),
     (), None, "time", True),
    ("newline-in-partition", _replace("mem: 1G", 'mem: 1G, partition: "gpu\\necho pwned"'), (), None,
     "partition", True),
    ("unknown-suffix", _replace("data/*.jsonl", "data/*.csv"), (), lambda r: (r / "data" / "a.csv").write_text("x\n"),
     "format", True),
    ("empty-inputs", GOOD, (), _empty_inputs, "no rows", True),
    ("bad-signal", GOOD + "resilience: {signal: USR9}\n", (), None, "signal", True),
    ("bad-mem", _replace("mem: 1G", "mem: 64 gigs"), (), None, "mem", True),
]


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, command, tmp_path, capsys, monkeypatch):
    case_id, text, sets, setup, fragment, has_line = case
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    job = write_job(tmp_path, text=text)
    if setup:
        setup(tmp_path)
    before = tree(tmp_path)
    argv = [command, str(job)] + [a for s in sets for a in ("--set", s)]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (case_id, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case_id}: expected one line, got:\n{err}"
    assert fragment.lower() in lines[0].lower(), (case_id, lines[0])
    if has_line:
        assert re.search(re.escape(str(job)) + r":\d+:", lines[0]), (case_id, lines[0])
    assert tree(tmp_path) == before, f"{case_id}: {command} wrote files"


def test_corpus_is_large_enough():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_missing_job_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
