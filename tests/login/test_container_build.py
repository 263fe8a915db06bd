"""container.def (CUDA from the profile's driver, hpcinfer from the wheel) and `hpcinfer container
build`. The recipe is parsed with spython and pinned by a golden file; accept an intended change
with: UPDATE_GOLDEN=1 pytest tests/login -k golden"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hpcinfer.cli import main
from hpcinfer.compile.container import CUDA_IMAGES, ContainerError, choose_cuda
from hpcinfer.compile.render import render_container_def
from hpcinfer.testing.golden import check_golden
from hpcinfer.testing.jobs import write_job
from hpcinfer.testing.plans import sample_plan
from hpcinfer.testing.tools import shellcheck_bin

WHEEL = "/scratch/jobs/qa-eval/hpcinfer-0.1.0-py3-none-any.whl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def parse(text: str, tmp_path: Path):
    from spython.main.parse.parsers import SingularityParser
    path = tmp_path / "container.def"
    path.write_text(text)
    return SingularityParser(str(path)).recipe["spython-base"]


def section(text: str, name: str) -> str:
    """The body of one %section of a definition."""
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", text, re.S | re.M)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("driver,cuda", [(None, "12.4"), ("525.147.05", "11.8"),
                                         ("535.183.01", "12.1"), ("550.54.14", "12.4"),
                                         ("565.57.01", "12.6"), ("570.26", "12.8"),
                                         ("590.1", "12.8")])
def test_cuda_is_the_newest_the_driver_runs(driver, cuda):
    assert choose_cuda(driver).cuda == cuda


def test_cuda_pin_and_bad_drivers():
    assert choose_cuda("570.26", "12.1").cuda == "12.1"      # the job's container.cuda wins
    with pytest.raises(ContainerError, match="choose one of 11.8, 12.1, 12.4, 12.6, 12.8"):
        choose_cuda(None, "13.9")
    with pytest.raises(ContainerError, match="older than CUDA 11.8 needs"):
        choose_cuda("470.82.01")
    with pytest.raises(ContainerError, match="not a version number"):
        choose_cuda("latest")
    assert [i.cuda for i in CUDA_IMAGES] == sorted((i.cuda for i in CUDA_IMAGES),
                                                   key=lambda v: tuple(map(int, v.split("."))))


def test_container_def_golden_parses_and_shell_sections_are_clean(tmp_path):
    text = render_container_def(sample_plan("single", container=True, cuda="12.8"), wheel=WHEEL,
                                commit=COMMIT)
    check_golden("container-cuda12.8.def", text)
    recipe = parse(text, tmp_path)
    assert recipe.fromHeader == "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"
    assert recipe.files == [f"{WHEEL} /opt/hpcinfer/wheels/hpcinfer-0.1.0-py3-none-any.whl"]
    assert {"org.hpcinfer.version 0.1.0", f"org.hpcinfer.commit {COMMIT}",
            "org.hpcinfer.cuda 12.8"} <= set(recipe.labels)
    for needed in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "HF_DATASETS_OFFLINE=1"):
        assert needed in recipe.environ
    assert any(e.startswith("HF_HUB_CACHE=") for e in recipe.environ)
    install = "\n".join(recipe.install)
    assert "torch --index-url https://download.pytorch.org/whl/cu128" in install
    assert ("pip install --no-cache-dir hpcinfer==0.1.0 --no-index --no-deps --find-links "
            "/opt/hpcinfer/wheels") in install
    assert recipe.cmd == 'exec hpcinfer "$@"'
    assert "torch.cuda.is_available()" in section(text, "test")
    for name in ("environment", "post", "test", "runscript"):
        script = tmp_path / f"{name}.sh"
        script.write_text("#!/bin/bash\n" + section(text, name))
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, name
        lint = subprocess.run([shellcheck_bin(), "--severity=warning", str(script)],
                              capture_output=True, text=True)
        assert lint.returncode == 0, f"%{name}: {lint.stdout}"


def write_profile(root: Path, driver: str) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.yaml").write_text(yaml.safe_dump({"slurm": {"cuda_driver": driver}}))
    return "./site.yaml"


def test_profile_driver_picks_the_image_and_a_bad_one_points_at_the_profile(tmp_path, capsys):
    job = write_job(tmp_path / "a", cluster=write_profile(tmp_path / "a", "535.104.05"))
    assert main(["render", str(job), "--container-def"]) == 0, capsys.readouterr().err
    text = (tmp_path / "a" / "out" / "container.def").read_text()
    assert "From: nvidia/cuda:12.1.1-cudnn8-runtime-ubuntu22.04" in text
    from hpcinfer.compile.container import source_commit
    assert f"org.hpcinfer.commit {source_commit()}\n" in text
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert re.search(r"org\.hpcinfer\.commit [0-9a-f]{40}(\+dirty)?\n", text)
    job = write_job(tmp_path / "b", cluster=write_profile(tmp_path / "b", "418.67"))
    assert main(["render", str(job)]) == 2
    err = capsys.readouterr().err
    assert "driver 418.67 is older than CUDA 11.8 needs" in err and "cuda_driver" in err
    job = write_job(tmp_path / "c", container={"image": "docker://x/y", "cuda": "12.6"})
    assert main(["render", str(job), "--container-def"]) == 0, capsys.readouterr().err
    assert "whl/cu126" in (tmp_path / "c" / "out" / "container.def").read_text()


def fake_wheel(where: Path, version: str = "0.1.0") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"hpcinfer-{version}-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    return wheel


def rendered_job(tmp_path: Path, capsys) -> Path:
    job = write_job(tmp_path / "w")
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return tmp_path / "w" / "out"


def test_build_without_a_runtime_prints_the_exact_command(tmp_path, capsys, monkeypatch):
    job_dir = rendered_job(tmp_path, capsys)
    wheel = fake_wheel(tmp_path / "dist")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert main(["container", "build", str(job_dir), "--wheel", str(wheel)]) == 0
    out = capsys.readouterr().out
    fakeroot = " --fakeroot" if os.geteuid() != 0 else ""
    assert (f"cd {job_dir} && apptainer build{fakeroot} {job_dir}/hpcinfer-0.1.0.sif "
            f"{job_dir}/container.def") in out
    assert "no apptainer or singularity here" in out
    definition = (job_dir / "container.def").read_text()
    assert f"    {wheel} /opt/hpcinfer/wheels/{wheel.name}\n" in definition


def test_build_runs_the_runtime_in_the_job_dir(tmp_path, capsys, monkeypatch):
    job_dir = rendered_job(tmp_path, capsys)
    wheel = fake_wheel(tmp_path / "dist")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # A stand-in for apptainer: records its arguments and cwd, writes the image.
    (bin_dir / "apptainer").write_text(f'#!/bin/bash\necho "$PWD $*" >> {calls}\n'
                                       'touch "${@: -2:1}"\n')
    (bin_dir / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    image = tmp_path / "images" / "hpcinfer.sif"
    image.parent.mkdir()
    assert main(["container", "build", str(job_dir), "--wheel", str(wheel),
                 "--image", str(image)]) == 0, capsys.readouterr().err
    assert f"built {image}" in capsys.readouterr().out and image.is_file()
    cwd, *args = calls.read_text().split()
    assert cwd == str(job_dir) and args[0] == "build"
    assert args[-2:] == [str(image), str(job_dir / "container.def")]


def test_build_refuses_a_wheel_of_another_version(tmp_path, capsys):
    job_dir = rendered_job(tmp_path, capsys)
    wheel = fake_wheel(tmp_path / "dist", "0.0.9")
    assert main(["container", "build", str(job_dir), "--wheel", str(wheel)]) == 2
    err = capsys.readouterr().err
    assert "hpcinfer-0.0.9-py3-none-any.whl is hpcinfer 0.0.9" in err and "0.1.0" in err
    assert main(["container", "build", str(job_dir), "--wheel", str(tmp_path / "x.whl")]) == 2
    assert "is not an hpcinfer wheel" in capsys.readouterr().err


def test_build_without_a_wheel_builds_this_version_with_pip(tmp_path, capsys, monkeypatch):
    """From a job file: render, `pip wheel --no-deps` of this source tree into the job dir."""
    job = write_job(tmp_path / "w")
    only_git = tmp_path / "only-git"           # no container runtime, whatever this host has
    only_git.mkdir()
    if shutil.which("git"):
        (only_git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(only_git))
    assert main(["container", "build", str(job)]) == 0, capsys.readouterr().err
    job_dir = tmp_path / "w" / "out"
    wheel = job_dir / "hpcinfer-0.1.0-py3-none-any.whl"
    assert wheel.is_file() and (job_dir / "submit.sbatch").is_file()
    assert f"    {wheel} /opt/hpcinfer/wheels/{wheel.name}\n" in (job_dir / "container.def").read_text()
