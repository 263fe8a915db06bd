"""The cluster profiles run jobs the way the sites' own guides do (issue 16):

- AAU AI Cloud: `singularity exec --nv` the site's vLLM image (torch + transformers inside), with
  this hpcinfer copied into the job dir and put on PYTHONPATH: the starting file renders as
  written, no image to build.
- Alliance Canada: `module load StdEnv/2023 python/3.12` and the virtualenv's python, apptainer
  only for a job with a container; --account required, and not a placeholder.

The rendered scripts are golden files (paths normalised), checked with bash -n and shellcheck.
Accept an intended change with: UPDATE_GOLDEN=1 pytest tests/login -k golden
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hpcinfer.cli import main
from hpcinfer.compile.jobdir import compile_job, write_job_dir
from hpcinfer.config import ConfigError, init_text, load_job
from hpcinfer.testing.golden import check_golden
from hpcinfer.testing.tools import shellcheck_bin

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "num_attention_heads": 4, "num_hidden_layers": 2}


def _starting_file(tmp_path, cluster: str, **fill: str):
    """`hpcinfer init --cluster` output with its CHANGE-ME lines filled in, as a user would."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    text = init_text(cluster).replace("id: CHANGE-ME ", "id: ./model ")
    text = text.replace("path: [CHANGE-ME/*.jsonl]", "path: [data/*.jsonl]")
    for old, new in fill.items():
        text = text.replace(old, new)
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return job


def _normalised(text: str, tmp_path) -> str:
    return text.replace(str(tmp_path), "/home/u/work").replace(sys.executable,
                                                                "/home/u/env/bin/python")


def _lint(tmp_path, text: str) -> None:
    script = tmp_path / "lint.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lint = subprocess.run([shellcheck_bin(), "--severity=style", str(script)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_aau_starting_file_renders_in_the_sites_vllm_image(tmp_path, monkeypatch):
    # /home/container/vllm-openai_latest.sif exists on the AI Cloud; here a stand-in file at
    # the same path inside tmp (the profile's path is the one in the rendered script).
    site_image = "/home/container/vllm-openai_latest.sif"
    stand_in = tmp_path / "vllm-openai_latest.sif"
    stand_in.write_text("sif")
    job = _starting_file(tmp_path, "aau-ai-cloud")
    assert "CHANGE-ME" not in job.read_text()      # only what a user must fill was changed
    assert f"image: {site_image}" in job.read_text()
    assert "hpcinfer: job-dir" in job.read_text()
    cfg = load_job(job, [f"container.image={stand_in}"])
    rendered = compile_job(cfg)
    write_job_dir(rendered)
    script = rendered.script_path.read_text()
    site = rendered.job_dir / "python"
    assert f"--env PYTHONPATH={site}" in script and "singularity exec --nv" in script
    assert "module load" not in script
    check_golden("aau-ai-cloud.sbatch", _normalised(script, tmp_path).replace(
        str(stand_in).replace(str(tmp_path), "/home/u/work"), site_image))
    _lint(tmp_path, script)
    # The copy is a whole hpcinfer, laid out as installed (kernels, templates, profiles
    # inside the package), and it is what a Python with that PYTHONPATH imports.
    for name in ("worker/__main__.py", "kernels/__init__.py", "job_templates/sbatch_base.j2",
                 "configs/clusters/aau-ai-cloud.yaml"):
        assert (site / "hpcinfer" / name).is_file(), name
    code = ("import hpcinfer, hpcinfer.kernels, hpcinfer.io.readers; "
            "print(hpcinfer.__file__); print(hpcinfer.kernels.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=True).stdout.splitlines()
    assert all(line.startswith(str(site)) for line in out), out


def test_aau_with_an_image_of_your_own_copies_nothing(tmp_path):
    image = tmp_path / "hpcinfer.sif"
    image.write_text("sif")
    job = _starting_file(tmp_path, "aau-ai-cloud")
    cfg = load_job(job, [f"container.image={image}", "container.hpcinfer=image"])
    rendered = compile_job(cfg)
    write_job_dir(rendered)
    assert "PYTHONPATH" not in rendered.script_path.read_text()
    assert not (rendered.job_dir / "python").exists()


@pytest.mark.parametrize("with_container", [False, True])
def test_alliance_loads_python_and_apptainer_only_with_a_container(tmp_path, with_container):
    job = _starting_file(tmp_path, "alliance-canada",
                         **{"account: CHANGE-ME ": "account: def-someone "})
    overrides = []
    if with_container:
        image = tmp_path / "hpcinfer.sif"
        image.write_text("sif")
        overrides.append(f"container={{image: {image}}}")
    script = dict(compile_job(load_job(job, overrides)).files)["submit.sbatch"]
    modules = [line for line in script.splitlines() if line.startswith("module load")]
    expected = ["module load StdEnv/2023", "module load python/3.12"]
    assert modules == expected + (["module load apptainer"] if with_container else [])
    assert "#SBATCH --account=def-someone" in script
    if not with_container:
        # the virtualenv the wiki has you create: its python (the one that rendered) runs it
        assert f"worker=({sys.executable} -m hpcinfer.worker" in script
        check_golden("alliance-canada.sbatch", _normalised(script, tmp_path))
    _lint(tmp_path, script)


@pytest.mark.parametrize("account", ["CHANGE-ME", "def-yourpi"])
def test_alliance_placeholder_account_is_refused(tmp_path, capsys, account, monkeypatch):
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    job = _starting_file(tmp_path, "alliance-canada",
                         **{"account: CHANGE-ME ": f"account: {account} "})
    assert main(["render", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"resources.account: '{account}' is a placeholder" in err and "sshare" in err


def test_alliance_account_is_required(tmp_path, monkeypatch):
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    job = _starting_file(tmp_path, "alliance-canada",
                         **{"account: CHANGE-ME ": "account: null "})
    with pytest.raises(ConfigError) as info:
        load_job(job)
    assert "requires a Slurm account" in info.value.problem
