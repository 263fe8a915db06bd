"""HF_TOKEN is never written anywhere, and reaches the job only when the profile asks for it.

The job runs through the local backend (the same rendered script Slurm would run), with the
worker's preflight phase. A wrapper in front of the worker's Python records only *whether* the
token arrived, never its value.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from hpcinfer.cli import main
from hpcinfer.testing.jobs import write_job

SECRET = "hf_secret_test_value"


def site_profile(root: Path, pass_token: bool) -> str:
    """A cluster profile file next to the job: generic, optionally passing HF_TOKEN."""
    root.mkdir(parents=True, exist_ok=True)
    slurm = {"env_from_environment": ["HF_TOKEN"] if pass_token else []}
    (root / "site.yaml").write_text(yaml.safe_dump({"description": "test site", "slurm": slurm}))
    return "./site.yaml"


def files_containing(root: Path, needle: str) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            hits.append(str(path.relative_to(root)))
    return hits


@pytest.fixture
def token_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    monkeypatch.setenv("HPCINFER_WORKER_PHASES", "preflight")


def test_render_and_local_run_never_write_the_token(tmp_path, token_env, capsys):
    job = write_job(tmp_path, cluster=site_profile(tmp_path, pass_token=True))
    assert main(["render", str(job), "--container-def"]) == 0
    rendered = capsys.readouterr()
    assert main(["run", str(job), "--local"]) == 0, capsys.readouterr().err
    ran = capsys.readouterr()
    job_dir = tmp_path / "out"
    assert (job_dir / "container.def").is_file() and list((job_dir / "logs").iterdir())
    assert list((job_dir / "metrics").iterdir())               # the worker ran and reported
    assert files_containing(tmp_path, SECRET) == []            # job dir, logs, metrics, inputs
    for stream in (rendered.out, rendered.err, ran.out, ran.err):
        assert SECRET not in stream
    # The name is there (the job asks for it), never the value.
    assert "HF_TOKEN" in (job_dir / "submit.sbatch").read_text()
    assert "HF_TOKEN is not set" not in "".join(p.read_text() for p in (job_dir / "logs").iterdir())


@pytest.mark.parametrize("pass_token", [True, False], ids=["profile-asks", "profile-silent"])
def test_the_job_sees_the_token_only_when_the_profile_asks(tmp_path, token_env, pass_token):
    from hpcinfer.compile.jobdir import compile_job, write_job_dir
    from hpcinfer.config import load_job
    from hpcinfer.slurm.local import run_job_dir
    seen = tmp_path / "seen"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/bash\necho "HF_TOKEN=${{HF_TOKEN:+set}} '
                       f'HUGGING_FACE_HUB_TOKEN=${{HUGGING_FACE_HUB_TOKEN:+set}}" >> {seen}\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    job = write_job(tmp_path / "w", rows=(3,), cluster=site_profile(tmp_path / "w", pass_token))
    rendered = compile_job(load_job(job), python=str(wrapper))
    assert run_job_dir(write_job_dir(rendered), echo=False) == 0
    expected = "HF_TOKEN=set HUGGING_FACE_HUB_TOKEN=" if pass_token else \
        "HF_TOKEN= HUGGING_FACE_HUB_TOKEN="
    assert seen.read_text().strip() == expected
    assert files_containing(tmp_path / "w", SECRET) == []
    assert os.environ["HF_TOKEN"] == SECRET          # only the job's shell dropped it
