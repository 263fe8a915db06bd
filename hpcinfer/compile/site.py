"""container.hpcinfer: job-dir: a copy of this hpcinfer inside the job dir, for images that have
torch and transformers but not hpcinfer (the AAU AI Cloud's vLLM image, for one).

The copy is the package the login side is running, so the worker is exactly the version that
rendered the job. It is laid out as an installed wheel would be (kernels/, job_templates/ and
configs/ live at the top of a source checkout but install as hpcinfer.kernels and so on, see
pyproject.toml), put under JOBDIR/python/hpcinfer, and the batch script puts JOBDIR/python on
the container's PYTHONPATH. Pure Python: nothing is compiled or installed.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

SITE_DIR_NAME = "python"
# Subpackages that setuptools maps from top-level directories (pyproject package-dir).
_MAPPED = ("kernels", "job_templates", "configs")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)       # imports the parent package only
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"cannot find the package {name} of this hpcinfer")
    return Path(list(spec.submodule_search_locations)[0])


def copy_hpcinfer(site_dir: Path) -> Path:
    """Write site_dir/hpcinfer (replacing an older copy); returns that package dir."""
    site_dir.mkdir(parents=True, exist_ok=True)
    staging = site_dir / ".hpcinfer.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(_package_dir("hpcinfer"), staging, ignore=_IGNORE)
    for name in _MAPPED:
        source = _package_dir(f"hpcinfer.{name}")
        if source.resolve() != (staging / name).resolve():
            shutil.rmtree(staging / name, ignore_errors=True)
            shutil.copytree(source, staging / name, ignore=_IGNORE)
    target = site_dir / "hpcinfer"
    old = site_dir / ".hpcinfer.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)     # a running task keeps reading its open files
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
