"""Rendered scripts treat every user string as data. Paths, env values, container image and
binds carry spaces, quotes, $(...), backticks, ;, newlines and *; the script then runs under
bash with stub srun/scontrol/sbatch/apptainer on PATH (they record the argv they receive) and
a real preflight worker. The payload must never run, and every string must arrive verbatim."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcinfer.cli import main
from hpcinfer.testing.jobs import write_rows

NASTY = "we ird 'sq' \"dq\" ;x* $(touch {m}/MARKER1) `touch {m}/MARKER2`\nnext"
# Directory names carry everything but the newline; a newline in the job file's own path is
# covered by test_newline_in_job_dir_path below.
NASTY_PATH = NASTY.replace("\n", " ")

# Each stub appends {"argv": [...], "env": {...}} to $STUB_LOG, then does what the real
# command would do for the script: srun and apptainer exec the command at their end.
STUB = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"cmd": name, "argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {{k: v for k, v in os.environ.items() if k.startswith("INJ_")}}}}) + "\\n")
args = sys.argv[1:]
if name == "srun":
    while args and args[0].startswith("-"):
        args.pop(0)
elif name == "apptainer":
    assert args.pop(0) == "exec"
    while args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("--bind", "--env"):
            value = args.pop(0)
            if opt == "--env":
                k, _, v = value.partition("=")
                os.environ[k] = v
    args.pop(0)                      # the image
    if args[0] == "python3":
        args[0] = {python!r}
elif name == "sbatch":
    print("4242")
    sys.exit(0)
else:                                # scontrol: nothing to do here
    sys.exit(0)
os.execvp(args[0], args)
"""


def glob_escape(text: str) -> str:
    import glob
    return glob.escape(text)


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch", "apptainer"):
        path = bin_dir / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _nasty_job(tmp_path: Path, marker_dir: Path, container: bool,
               dir_name: str = NASTY_PATH) -> tuple[Path, dict]:
    nasty = NASTY.format(m=marker_dir)
    root = tmp_path / dir_name.format(m=marker_dir)
    (root / "model").mkdir(parents=True)
    write_rows(root / f"data {NASTY_PATH.format(m=marker_dir)}" / "part-0.jsonl", 3)
    values = {"INJ_A": nasty, "INJ_B": "$(touch %s/MARKER3); `touch %s/MARKER4` *" % (marker_dir, marker_dir),
              "INJ_C": "'; touch %s/MARKER5; echo '" % marker_dir}
    config = {
        "name": "inj", "cluster": "generic", "model": {"id": "./model"},
        "input": {"path": f"data {glob_escape(NASTY_PATH.format(m=marker_dir))}/*.jsonl",
                  "prompt_field": "prompt", "shard_rows": 10},
        "output": {"dir": f"out {dir_name.format(m=marker_dir)}"}, "env": values,
        "resources": {"device": "cpu", "time": "00:05:00", "cpus_per_task": 1, "mem": "1G"},
    }
    if container:
        image = root / f"image {NASTY_PATH.format(m=marker_dir)}.sif"
        image.parent.mkdir(parents=True, exist_ok=True)   # the payload's "/" make subdirs
        image.write_text("")
        config["container"] = {"image": str(image), "runtime": "apptainer",
                               "binds": [f"/tmp/bind {nasty}"], "env": {"INJ_D": nasty}}
        values = {**values, "INJ_D": nasty}
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    return job, values


@pytest.mark.parametrize("container", [False, True], ids=["bare", "container"])
def test_payload_never_runs_and_strings_arrive_verbatim(container, tmp_path, capsys):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    job, values = _nasty_job(tmp_path, marker_dir, container)
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    job_dir = job.parent / f"out {NASTY_PATH.format(m=marker_dir)}"
    script = job_dir / "submit.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PATH": f"{_stubs(tmp_path)}:{os.environ['PATH']}",
           "STUB_LOG": str(tmp_path / "stub.log"), "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0",
           "SLURM_JOB_NODELIST": "node1"}
    env.pop("INJ_A", None)
    proc = subprocess.run(["bash", str(script)], cwd=job_dir, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight ok" in proc.stderr + proc.stdout
    assert list(marker_dir.iterdir()) == [], "a payload ran"
    calls = [json.loads(ln) for ln in (tmp_path / "stub.log").read_text().splitlines()]
    srun = next(c for c in calls if c["cmd"] == "srun")
    assert srun["argv"][-1] == str(job_dir) and srun["cwd"] == str(job_dir)
    if container:
        app = next(c for c in calls if c["cmd"] == "apptainer")
        argv = app["argv"]
        assert str(job.parent / f"image {NASTY_PATH.format(m=marker_dir)}.sif") in argv
        assert f"/tmp/bind {NASTY.format(m=marker_dir)}" in argv
        assert f"INJ_D={NASTY.format(m=marker_dir)}" in argv
        assert str(job_dir) in argv
    exported = {k: v for k, v in srun["env"].items() if k != "INJ_D"}
    assert exported == {k: v for k, v in values.items() if k != "INJ_D"}


def test_submit_runs_sbatch_in_the_job_dir_with_no_user_strings_on_its_command_line(tmp_path, capsys):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    job, _ = _nasty_job(tmp_path, marker_dir, container=False)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{_stubs(tmp_path)}:{old_path}"
    os.environ["STUB_LOG"] = str(tmp_path / "stub.log")
    try:
        assert main(["submit", str(job)]) == 0, capsys.readouterr().err
    finally:
        os.environ["PATH"] = old_path
        del os.environ["STUB_LOG"]
    assert "submitted job 4242" in capsys.readouterr().out
    [call] = [json.loads(ln) for ln in (tmp_path / "stub.log").read_text().splitlines()]
    assert call["argv"] == ["--parsable", "submit.sbatch"]
    assert call["cwd"] == str(job.parent / f"out {NASTY_PATH.format(m=marker_dir)}")
    assert list(marker_dir.iterdir()) == []


def test_newline_in_job_dir_path(tmp_path, capsys):
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    job, _ = _nasty_job(tmp_path, marker_dir, container=False, dir_name=NASTY)
    assert main(["render", str(job)]) == 0
    from hpcinfer.config import load_resolved
    load_resolved(job.parent / f"out {NASTY.format(m=marker_dir)}" / "job.yaml")
